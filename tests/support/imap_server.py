"""A real IMAP server on loopback: Dovecot (Debian's ``dovecot-imapd``) with its own config in a temp folder.

One user from a ``passwd-file``, Maildir storage, plaintext login over loopback only
(``ssl = no``). Started as root, mail is owned by ``nobody`` (Dovecot refuses root);
started by anyone else, by that user.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from flows.surfaces.outbox import free_port

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{root}/mail/%u
first_valid_uid = 1
{internal}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def dovecot_binary() -> str | None:
    return shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)


class ImapServer:
    def __init__(self, user: str = "bounces", password: str = "s3cret p@ss/%") -> None:
        self.user, self.password, self.port = user, password, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.config = self.root / "dovecot.conf"

    @property
    def url(self) -> str:
        from urllib.parse import quote

        return f"imap://{quote(self.user, safe='')}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/INBOX"

    def start(self) -> "ImapServer":
        binary = dovecot_binary()
        assert binary, "dovecot is not installed (apt-get install dovecot-imapd)"
        for folder in ("run", "state", "mail"):
            (self.root / folder).mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("nobody")
            os.chown(self.root / "mail", owner.pw_uid, owner.pw_gid)
            uid, gid, internal = owner.pw_uid, owner.pw_gid, ""
        else:
            me = pwd.getpwuid(os.geteuid())
            uid, gid = me.pw_uid, me.pw_gid
            internal = f"default_internal_user = {me.pw_name}\ndefault_login_user = {me.pw_name}"
        self.root.chmod(0o755)
        (self.root / "passwd").write_text(f"{self.user}:{{PLAIN}}{self.password}\n")
        self.config.write_text(CONFIG.format(root=self.root, port=self.port, uid=uid, gid=gid, internal=internal))
        subprocess.run([binary, "-c", str(self.config)], check=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"dovecot did not listen on {self.port}: {self.log()}")

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        binary = dovecot_binary()
        if binary and (self.root / "run" / "master.pid").exists():
            subprocess.run([binary, "-c", str(self.config), "stop"], check=False)
            deadline = time.monotonic() + 10
            while (self.root / "run" / "master.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)
