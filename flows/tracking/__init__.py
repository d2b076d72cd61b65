"""Engagement: tracked links and the open pixel in marketing mail, and what a click records.

``rewrite`` turns a rendered mail's links into ``/c/TOKEN`` links before it is composed;
``clicks`` decides what a request to such a link was (a person, a scanner, a repeat) and
records it. Service mail is never tracked, nor a customer who left tracking.
"""
