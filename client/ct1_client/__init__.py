"""ct1-cdc's client for CT2 and CT3: verifying webhooks (:mod:`ct1_client.webhooks`) and a
receiver that verifies each request and hands the envelope on (:mod:`ct1_client.receiver`).

Its own distribution (``pip install ./client``), with nothing of the sidecar in it.
"""
