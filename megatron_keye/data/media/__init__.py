"""Media front end: image and video decoding, smart resize, SlowFast, token budgets, patch rows."""
