"""The web product's pages: the public homepage and the signed-in dashboard (usage, billing,
playground), one base layout and the helper every domain's pages render through.

Pages are server-rendered Jinja2 with a little plain JavaScript; every action a page offers calls
the same ``/api`` JSON routes a script would (or the public ``/v1``, for the playground).
"""

from dubhe.dashboard.templating import render, static_url

__all__ = ["render", "static_url"]
