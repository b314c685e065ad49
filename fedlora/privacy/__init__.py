"""Privacy of client updates: secure aggregation (:mod:`.secagg`, :mod:`.rounds`), differential privacy (:mod:`.dp`)."""
