"""A small multi-task ranking model trained with `losses` on synthetic engagement data (`make demo`)."""
