"""client/report.py's scrape of a Prometheus endpoint, against a live /metrics server."""

from __future__ import annotations

from client.report import scrape
from server.frontend.metrics import Metrics


def test_scrape_reads_every_sample_with_its_labels():
    metrics = Metrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        metrics.set_pace("mixed", 1.25, repaced=True)
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()
    assert samples[("lockstep_pace_factor", (("phase", "mixed"),))] == 1.25
    assert samples[("lockstep_repaces_total", (("phase", "mixed"),))] == 1.0
