"""Only the compiled part of the build; everything else is in pyproject.toml.

``cdc._wal2json`` decodes wal2json row messages on capture's hot path.  It is optional:
without a C compiler the install still succeeds and ``cdc.decode`` does the same work in
Python (slower; ``ct1-cdc run`` logs which one it uses).  ``cdc._frames`` reads the
replication stream many frames a call and hands row changes to that decoder straight from
libpq's buffer; without it capture reads a frame at a time through psycopg.  ``outbox._append`` inserts
capture's events on a native thread; without it the writer uses sqlite3's executemany.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("cdc._wal2json", ["cdc/_wal2json.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("cdc._frames", ["cdc/_frames.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("outbox._append", ["outbox/_append.c"], optional=True, extra_compile_args=["-O2"]),
    ]
)
