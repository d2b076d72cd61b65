"""Lifecycle: trigger files compiled into Prefect flows that send lifecycle email exactly once.

The pipeline reads top to bottom: ``spec`` (trigger files) → ``audience`` (who is due)
→ ``render`` (personalised content) → ``compose`` (MIME) → ``dispatch`` (SMTP)
→ ``ledger`` (exactly once), wired together by ``pipeline``.
"""
