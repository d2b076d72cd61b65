"""What the suite shares: builders, real peers (SMTP, IMAP, Prefect, web), and run helpers."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the project folder
FIXTURES = ROOT / "tests" / "fixtures"
SECRET = "test-secret-0123456789"  # the settings fixture's LIFECYCLE_SECRET: fixtures' tokens are signed with it


def copy_project(target: Path) -> Path:
    """A copy of the shipped triggers and templates at ``target``, without the shipped holdouts
    (the ``project_dir`` fixture's, and a shared one's)."""
    shutil.copytree(ROOT / "triggers", target / "triggers")
    shutil.copytree(ROOT / "templates", target / "templates")
    for trigger in (target / "triggers").glob("*.yaml"):
        text = trigger.read_text()
        if "\nholdout" in text:
            trigger.write_text("".join(line for line in text.splitlines(keepends=True)
                                       if not line.startswith("holdout")))
    return target
