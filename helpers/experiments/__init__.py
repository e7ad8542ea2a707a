"""The experiments, one module per result: audits, collisions, attacks, polytopes, the gauge, implications."""
