"""The event path's core: what this kernel can do (kernel, btf), which probe serves which
point (plan), the event table and the metric contract (events, metrics), the aggregator and
the pipeline, and the namespaces' own counters (netns, nsconfig, cgroups, reconcile)."""
