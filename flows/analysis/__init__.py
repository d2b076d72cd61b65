"""What the mail did: orders attributed to sends (``attribution``), and the lift a trigger's
holdout group measures (``holdouts``, with the statistics in ``lift``)."""
