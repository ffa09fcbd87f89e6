"""Plans, included tokens, prepaid balance: admission, settlement and credits.

Billing is the one place that owns its transactions (services elsewhere never commit): a request's
reservation must be committed before the upstream call and its settlement must survive the request's
own cancellation, so neither can ride on a request-scoped session.
"""
