"""Killed hard (SIGKILL) in the middle of a send, then run again: nothing twice, nothing lost
beyond the few messages that were being handed over at the moment of the kill."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from pydantic import SecretStr

from flows.settings import Settings
from tests.support.builders import NOW, Store
from tests.support.children import child_env
from tests.support.ledger import addresses
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

RECIPIENTS = 300
CONNECTIONS = 4
IN_FLIGHT = 20  # claims open at once per sender; accepted mail is recorded per window of this size
WORKERS = 2  # sender processes: a kill of the run kills them too
CHILD = """
import sys
from datetime import datetime
from flows.run import execute
from flows.run_context import prepare
from flows.surfaces.environment import settings_from_environment
execute(prepare("winback-lapsed", datetime.fromisoformat(sys.argv[1]), settings=settings_from_environment()))
"""


@pytest.mark.parametrize("kill_after", [20, 140, 260])
def test_a_hard_kill_then_a_rerun_sends_every_mail_once(settings: Settings, store: Store, kill_after: int) -> None:
    slow = SmtpServer(data_delay=0.005).start()  # ~1,000 a second at most: room to kill mid-run
    try:
        emails = set(store.lapsed(RECIPIENTS))
        killed = settings.model_copy(update={
            "smtp_url": f"smtp://127.0.0.1:{slow.port}?connections={CONNECTIONS}",
            "batch_size": 100, "in_flight": IN_FLIGHT, "workers": WORKERS, "secret": SecretStr("crash-test-secret")})
        child = subprocess.Popen([sys.executable, "-c", CHILD, NOW.isoformat()], env=child_env(killed))
        deadline = time.monotonic() + 60
        while len(slow.received) < kill_after and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        time.sleep(0.3)  # what was on the wire at the kill lands
        before = len(slow.received)
        time.sleep(0.7)
        assert len(slow.received) == before, "a sender process outlived the killed run and kept sending"
        assert 0 < before < RECIPIENTS, "the kill must land mid-run"

        # The next run (the killed run's lease is over: it is dead) finishes the job.
        rerun = settings.model_copy(update={"claim_lease_seconds": 0,
                                            "smtp_url": f"smtp://127.0.0.1:{slow.port}?connections={CONNECTIONS}"})
        run(rerun, "winback-lapsed")
    finally:
        slow.stop()

    received = Counter(r.recipients[0] for r in slow.received)
    in_doubt, sent = addresses(store.engine, "sending"), addresses(store.engine, "sent")
    print(f"\nkilled after {before} accepted: {len(in_doubt)} in doubt, "
          f"{sum(1 for e in in_doubt if e in received)} of them accepted by the server")
    assert set(received.values()) == {1}  # nobody got it twice
    assert len(in_doubt) <= WORKERS * IN_FLIGHT  # at most the messages in flight when the kill came
    assert set(received) | in_doubt == emails  # nobody lost but those in doubt (listed for ops)
    assert sent == set(received) - in_doubt  # the ledger never claims more than the server took
