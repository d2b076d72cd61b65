"""A small SMTP server on loopback that offers PIPELINING and answers each command as a test's
script says: late, malformed, or the way a broken server would (DATA accepted without a
valid recipient). aiosmtpd answers by the book; these are the replies a client must survive.

    server = ScriptedSmtp(lambda session, command: None).start()   # None: the usual reply
    ...
    server.delivered   # (session number, its recipients) for each content answered 250
"""

import asyncio
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Session:
    number: int
    recipients: list[str] = field(default_factory=list)
    in_mail: bool = False


# (the session, the command line or "." for a content's end) → (reply, seconds before it), or None: the usual
Script = Callable[[Session, str], tuple[bytes, float] | None]

USUAL = {"MAIL": b"250 ok\r\n", "RCPT": b"250 ok\r\n", "DATA": b"354 go\r\n", ".": b"250 2.0.0 queued\r\n"}


class ScriptedSmtp:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.delivered: list[tuple[int, list[str]]] = []
        self.sessions = 0
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> "ScriptedSmtp":
        threading.Thread(target=self._loop.run_forever, name="scripted-smtp", daemon=True).start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _reply(self, session: Session, command: str, verb: str) -> bytes:
        scripted = self.script(session, command)
        reply, delay = scripted if scripted is not None else (USUAL.get(verb, b"500 5.5.2 what\r\n"), 0.0)
        if delay:
            await asyncio.sleep(delay)
        return reply

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        session = Session(self.sessions)
        writer.write(b"220 scripted ESMTP\r\n")
        in_data = False
        try:
            while line := await reader.readline():
                if in_data:
                    if line != b".\r\n":
                        continue
                    in_data, session.in_mail = False, False
                    reply = await self._reply(session, ".", ".")
                    if reply.startswith(b"250"):
                        self.delivered.append((session.number, list(session.recipients)))
                    session.recipients = []
                    writer.write(reply)
                    continue
                command = line.decode().strip()
                verb = command.split(" ")[0].upper()
                if verb == "EHLO":
                    writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb == "RSET":
                    session.recipients, session.in_mail = [], False
                    writer.write(b"250 reset\r\n")
                elif verb == "MAIL" and session.in_mail:
                    writer.write(b"503 5.5.1 nested MAIL command\r\n")  # a reply read for the wrong mail shows
                elif verb in ("RCPT", "DATA") and not session.in_mail:
                    writer.write(b"503 5.5.1 need MAIL command\r\n")
                else:
                    reply = await self._reply(session, command, verb)
                    if verb == "MAIL" and reply.startswith(b"250"):
                        session.in_mail = True
                    elif verb == "RCPT" and reply.startswith(b"25"):
                        session.recipients.append(command[len("RCPT TO:<"):-1])
                    elif verb == "DATA" and reply.startswith(b"354"):
                        in_data = True
                    writer.write(reply)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
