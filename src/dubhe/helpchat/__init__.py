"""The help chat: a visitor (signed in or not) writes from the button on every page; admins
answer from the console's inbox; answers reach the visitor's open panel live (server-sent
events fed by a per-worker poll of the database, so it works across workers and instances)."""
