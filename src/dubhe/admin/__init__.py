"""The admin console (``/admin`` pages, ``/admin/api`` JSON): users, models, upstreams,
redemption codes, the help-chat inbox, platform totals and the audit trail. Admins only."""
