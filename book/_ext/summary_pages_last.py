"""Read (and so execute) the summary pages after every chapter.

Sphinx reads documents in alphabetical order, so ``book/scorecard`` would run before
the chapters under ``notebooks/`` that write the results it summarises. This
extension moves the documents listed in the ``read_last`` option to the end of the
reading order, keeping their own order.
"""


def _move_summaries_last(app, env, docnames):
    last = [d for d in app.config.read_last if d in docnames]
    missing = [d for d in app.config.read_last if d not in env.found_docs]
    if missing:
        raise ValueError(f"read_last names documents that do not exist: {missing}")
    docnames[:] = [d for d in docnames if d not in last] + last


def setup(app):
    app.add_config_value("read_last", [], "env")
    app.connect("env-before-read-docs", _move_summaries_last)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
