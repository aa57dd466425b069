import os

# Notebooks executed by nbval inherit this; the CI profile keeps each chapter to seconds.
os.environ.setdefault("BOOK_PROFILE", "ci")
