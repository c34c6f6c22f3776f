-- Bridges (docs/workloads.md, "Bridges"): sources (a connection -> a pipeline's inputs) and sinks (a
-- pipeline's results -> a connection), followed by connector-bridge processes on joey.bridges.
CREATE TABLE bridges (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces(id),
    name         text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('source', 'sink')),
    pipeline     text NOT NULL,
    connection   text NOT NULL,
    what         text NOT NULL,
    paused       boolean NOT NULL DEFAULT false,
    created_by   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

-- What the connector-bridge running a bridge last reported; one row per bridge.
CREATE TABLE bridge_status (
    bridge_id  bigint PRIMARY KEY REFERENCES bridges(id) ON DELETE CASCADE,
    state      text NOT NULL,
    rows_moved bigint NOT NULL DEFAULT 0,
    lag        bigint NOT NULL DEFAULT -1,
    last_error text NOT NULL DEFAULT '',
    instance   text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A source's position (its last key acknowledged by Kafka), written only after the acknowledgement.
CREATE TABLE bridge_positions (
    bridge_id  bigint PRIMARY KEY REFERENCES bridges(id) ON DELETE CASCADE,
    position   jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
