"""Prefect events the engine emits, so deployments can react in seconds, not at the next cron tick."""

from collections.abc import Sequence

COMPLAINT_EVENT = "lifecycle.complaint.received"
COMPLAINT_RESOURCE_PREFIX = "lifecycle.complaint."


def emit_complaints(complaint_ids: Sequence[str], drain: bool = True) -> int:
    """Announce new complaints to the Prefect server in PREFECT_API_URL; returns how many.
    ``drain``: wait until they are sent (a command about to exit); a server process that
    goes on (``lifecycle web``) leaves them to Prefect's events worker thread.

    Without a configured server nothing is emitted (no temporary server is started just
    to drop an event): the complaint trigger's schedule picks the complaints up instead.
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not complaint_ids or not PREFECT_API_URL.value():
        return 0
    for complaint_id in complaint_ids:
        emit_event(
            event=COMPLAINT_EVENT,
            resource={"prefect.resource.id": f"{COMPLAINT_RESOURCE_PREFIX}{complaint_id}",
                      "prefect.resource.name": f"complaint {complaint_id}"},
        )
    if drain:
        EventsWorker.drain_all(timeout=30)  # the CLI exits right after: send before it does
    return len(complaint_ids)
