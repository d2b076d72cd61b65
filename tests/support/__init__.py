"""What the suite shares: builders, real peers (SMTP, IMAP, Prefect, web), and run helpers."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the project folder
FIXTURES = ROOT / "tests" / "fixtures"
SECRET = "test-secret-0123456789"  # the settings fixture's LIFECYCLE_SECRET: fixtures' tokens are signed with it
