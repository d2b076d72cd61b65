"""The audience stage: who is due, their stage, and when the policy lets a mail go."""
