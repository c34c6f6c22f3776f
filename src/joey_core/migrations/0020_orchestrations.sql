-- Orchestrations and tasks (docs/workloads.md, "Orchestrations and tasks").
-- The registry writes orchestrations, tasks and the first run of a one-off task; orchestrator processes
-- package orchestrations, fire schedules, claim runs (FOR UPDATE SKIP LOCKED) and write their outcome and
-- logs.

-- One row per uploaded version: its zip is an artifact (by sha256) of the registry's store.
CREATE TABLE orchestrations (
    id            bigserial PRIMARY KEY,
    workspace_id  bigint NOT NULL REFERENCES workspaces(id),
    name          text NOT NULL,
    version       integer NOT NULL,
    sha256        text NOT NULL,
    size_bytes    bigint NOT NULL,
    files         integer NOT NULL,
    status        text NOT NULL DEFAULT 'packaging' CHECK (status IN ('packaging', 'ready', 'error')),
    packaging_log text NOT NULL DEFAULT '',
    packaged_by   text NOT NULL DEFAULT '',
    packaged_at   timestamptz,
    created_by    text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name, version)
);
CREATE INDEX orchestrations_packaging ON orchestrations (id) WHERE status = 'packaging';

CREATE TABLE tasks (
    id                    bigserial PRIMARY KEY,
    workspace_id          bigint NOT NULL REFERENCES workspaces(id),
    name                  text NOT NULL,
    orchestration         text NOT NULL,
    orchestration_version integer,          -- NULL: the latest ready version at each run
    kind                  text NOT NULL CHECK (kind IN ('once', 'scheduled', 'continuous')),
    schedule              text NOT NULL DEFAULT '',
    json_args             jsonb NOT NULL DEFAULT '{}',
    timeout_s             double precision,  -- NULL: none
    retries               integer NOT NULL DEFAULT 0 CHECK (retries >= 0),
    owner                 text NOT NULL,     -- the user whose rights (in this workspace only) its runs have
    killed                boolean NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

CREATE TABLE task_runs (
    id                    bigserial PRIMARY KEY,
    task_id               bigint NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    attempt               integer NOT NULL DEFAULT 1,
    instant               timestamptz,       -- the schedule's instant this run is for; NULL otherwise
    status                text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'success', 'failure', 'killed', 'timed_out')),
    not_before            timestamptz NOT NULL DEFAULT now(),
    orchestrator          text NOT NULL DEFAULT '',
    lease_until           timestamptz,
    orchestration_version integer,
    exit_code             integer,
    reason                text NOT NULL DEFAULT '',
    log_lines             integer NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL DEFAULT now(),
    started_at            timestamptz,
    ended_at              timestamptz
);
-- A schedule's instant fires once, however many orchestrators race for it; retries are further attempts.
CREATE UNIQUE INDEX task_runs_instant ON task_runs (task_id, instant, attempt) WHERE instant IS NOT NULL;
-- One run of a task at a time: two orchestrators claiming two queued runs of one task cannot both win.
CREATE UNIQUE INDEX task_runs_one_running ON task_runs (task_id) WHERE status = 'running';
CREATE INDEX task_runs_task ON task_runs (task_id, id DESC);
CREATE INDEX task_runs_pending ON task_runs (not_before, id) WHERE status = 'pending';
CREATE INDEX task_runs_running ON task_runs (lease_until) WHERE status = 'running';

-- stdout and stderr of a run, line by line, readable while it runs.
CREATE TABLE task_run_logs (
    run_id bigint NOT NULL REFERENCES task_runs(id) ON DELETE CASCADE,
    seq    integer NOT NULL,
    stream text NOT NULL CHECK (stream IN ('stdout', 'stderr', 'joey')),
    time   timestamptz NOT NULL DEFAULT now(),
    line   text NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- A task token: scoped to one workspace, and valid only while its run is running.
ALTER TABLE tokens DROP CONSTRAINT tokens_kind_check;
ALTER TABLE tokens ADD CONSTRAINT tokens_kind_check CHECK (kind IN ('session', 'api', 'task'));
ALTER TABLE tokens ADD COLUMN workspace_id bigint REFERENCES workspaces(id) ON DELETE CASCADE;
ALTER TABLE tokens ADD COLUMN run_id bigint REFERENCES task_runs(id) ON DELETE CASCADE;
CREATE INDEX tokens_run ON tokens (run_id) WHERE run_id IS NOT NULL;
