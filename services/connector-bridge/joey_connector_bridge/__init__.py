"""The connector-bridge: runs the bridges published on joey.bridges, streaming external stores into
pipelines' inputs (sources) and pipelines' results into external stores (sinks)."""
