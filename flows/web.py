"""``lifecycle web``: the small HTTP side of Lifecycle (template previews linked from Prefect runs)."""

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, PlainTextResponse

from flows.links import read_preview_token
from flows.settings import Settings
from flows.spec.problems import SpecError


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="Lifecycle", docs_url=None, redoc_url=None, openapi_url=None)
    secret = settings.secret.get_secret_value()

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/preview/{token}", response_class=HTMLResponse)
    def preview(token: str) -> HTMLResponse:
        """A trigger's mail for a sample customer; the link is signed, so only our links work."""
        from flows.clock import parse_now
        from flows.pipeline import prepare_job
        from flows.preview import PreviewError, html_part, sample_message

        found = read_preview_token(secret, token)
        if found is None:
            raise HTTPException(status_code=404, detail="unknown preview")
        trigger, stage, language = found
        try:
            job = prepare_job(trigger, parse_now(None), settings=settings)
            html = html_part(sample_message(job, stage, language))
        except (SpecError, PreviewError) as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex"})

    return app
