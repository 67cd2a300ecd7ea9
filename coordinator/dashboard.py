"""``GET /``: the page a person watches during a run.

The page is static; its script polls ``v1/status`` and draws the charts with Chart.js,
vendored in ``static/vendor/chartjs/``, so it needs nothing from the internet and shows
exactly what the API reports.
"""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def index():
    return render_template("dashboard.html")
