"""Trigger files and the stage rules: parsing, strict models, and located errors."""
