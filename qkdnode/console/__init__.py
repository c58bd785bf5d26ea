"""The operator web console: pages, live updates and history served by the node itself.

``service`` (the site service: hears the links, keeps the history), ``history`` (the
bounded SQLite time series), ``server`` (HTTP(S) routes), ``access`` (roles, CSRF),
``live`` (server-sent events), ``models`` (typed records). docs/console.md.
"""
