//! pforte's tables and functions in the shared database, created and migrated by pforte itself.
//!
//! `pforte_schema` holds the version; every node that starts takes a transaction-level advisory
//! lock, reads the version and applies the migrations it lacks, so several nodes starting at
//! once migrate once. A database newer than this binary is refused.
//!
//! Tables:
//! - `pforte_cluster`: one row; its row lock serialises every change of the seat count across
//!   the cluster, and it holds the limits in force (`limits`, written by the node that started
//!   or reloaded last: the one source of truth for capacity and quotas).
//! - `pforte_sessions`: the live sessions of every node.
//! - `pforte_counts`: live sessions in total (`t`), per org unit (`o`) and per user (`u`), kept
//!   with every insert and delete, so an admission never counts rows.
//! - `pforte_nodes`: each node's lease.
//! - `pforte_kills`: sessions ended elsewhere (an API kill on another node, a lapsed lease) that
//!   their own node must still end at its VPN server.

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock key of migrations ("pforte" in ASCII).
const MIGRATION_LOCK: i64 = 0x7066_6f72_7465;

/// Migrations, in order; each brings the schema to its version.
const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2)];

/// Version 2: `pforte_bump` in PL/pgSQL. A non-inlinable SQL function is parsed and planned on
/// every call; PL/pgSQL keeps its plan, which took a one-connect batch's `pforte_apply` from
/// about 0.27 to 0.1 ms (docs/BENCHMARKS.md, PostgreSQL cluster).
const V2: &str = r#"
CREATE OR REPLACE FUNCTION pforte_bump(p_ous text[], p_users text[], p_sign integer) RETURNS void
LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO pforte_counts (kind, key, n)
        SELECT 't', '', p_sign * cardinality(p_ous) WHERE cardinality(p_ous) > 0
        UNION ALL SELECT 'o', k, p_sign * count(*) FROM unnest(p_ous) k GROUP BY k
        UNION ALL SELECT 'u', k, p_sign * count(*) FROM unnest(p_users) k GROUP BY k
    ON CONFLICT (kind, key) DO UPDATE SET n = pforte_counts.n + excluded.n;
END
$f$;
"#;

const V1: &str = r#"
CREATE TABLE pforte_cluster (
    id integer PRIMARY KEY CHECK (id = 1),
    limits jsonb NOT NULL DEFAULT '{}',
    limits_node text,
    limits_at timestamptz
);
INSERT INTO pforte_cluster (id) VALUES (1);

CREATE TABLE pforte_sessions (
    id text PRIMARY KEY,
    node text NOT NULL,
    vpn text NOT NULL,
    instance text NOT NULL,
    session_key text NOT NULL,
    zone text NOT NULL,
    org_unit text NOT NULL,
    level integer NOT NULL,
    priority boolean NOT NULL,
    device_id text NOT NULL,
    username text NOT NULL,
    common_name text NOT NULL,
    remote_addr text NOT NULL,
    tunnel_ip text,
    pool_ip boolean NOT NULL,
    started_at bigint NOT NULL,
    bytes_received bigint NOT NULL,
    bytes_sent bigint NOT NULL
);
CREATE INDEX pforte_sessions_node ON pforte_sessions (node);

CREATE TABLE pforte_counts (
    kind "char" NOT NULL,
    key text NOT NULL,
    n integer NOT NULL,
    PRIMARY KEY (kind, key)
);
INSERT INTO pforte_counts VALUES ('t', '', 0);

CREATE TABLE pforte_nodes (
    node text PRIMARY KEY,
    lease_until timestamptz NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pforte_kills (
    node text NOT NULL,
    session_id text NOT NULL,
    why text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node, session_id)
);

-- Adds p_sign to the counts of these sessions' org units and users, and to the total.
CREATE FUNCTION pforte_bump(p_ous text[], p_users text[], p_sign integer) RETURNS void
LANGUAGE sql AS $f$
    INSERT INTO pforte_counts (kind, key, n)
        SELECT 't', '', p_sign * cardinality(p_ous) WHERE cardinality(p_ous) > 0
        UNION ALL SELECT 'o', k, p_sign * count(*) FROM unnest(p_ous) k GROUP BY k
        UNION ALL SELECT 'u', k, p_sign * count(*) FROM unnest(p_users) k GROUP BY k
    ON CONFLICT (kind, key) DO UPDATE SET n = pforte_counts.n + excluded.n;
$f$;

-- One writer batch of one node, atomically, in one round trip:
--   upsert: sessions recorded late or re-keyed (no capacity check),
--   admit:  candidates, decided in order against the cluster's counts and limits,
--   delete: ended sessions' ids,
--   bytes:  [{id, rx, tx}].
-- Returns {"admit": ["ok" | refusal reason, ...]} in the candidates' order.
CREATE FUNCTION pforte_apply(p_batch jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $f$
DECLARE
    lim jsonb;
    v_max integer;
    v_reserved integer;
    v_per_user integer;
    v_total integer;
    ou_n jsonb;
    user_n jsonb;
    c record;
    ou text;
    usr text;
    cap integer;
    quota integer;
    n_ou integer;
    n_user integer;
    results text[] := '{}';
    ok_idx bigint[] := '{}';
    ous text[];
    users text[];
    adm_ous text[];
    adm_users text[];
    n_all integer;
    n_general integer;
    fits boolean;
BEGIN
    -- Before the lock, what needs none: the candidates' rows are inserted now, invisible to
    -- every other transaction until the commit (admissions read the counters, not the rows);
    -- those refused are deleted again below. The lock is held for the decision and the
    -- counters only (and, unavoidably, the commit).
    IF p_batch ? 'admit' THEN
        SELECT count(*), count(*) FILTER (WHERE NOT (x->>'priority')::boolean)
          INTO n_all, n_general FROM jsonb_array_elements(p_batch->'admit') x;
        WITH ins AS (
            INSERT INTO pforte_sessions
                SELECT * FROM jsonb_populate_recordset(NULL::pforte_sessions, p_batch->'admit')
            RETURNING org_unit, username
        )
        SELECT array_agg(org_unit), array_agg(username) INTO adm_ous, adm_users FROM ins;
    END IF;

    IF p_batch ? 'admit' OR p_batch ? 'upsert' OR p_batch ? 'delete' THEN
        SELECT limits INTO lim FROM pforte_cluster WHERE id = 1 FOR UPDATE;
    END IF;

    IF p_batch ? 'upsert' THEN
        WITH up AS (
            INSERT INTO pforte_sessions
                SELECT * FROM jsonb_populate_recordset(NULL::pforte_sessions, p_batch->'upsert')
            ON CONFLICT (id) DO UPDATE SET session_key = excluded.session_key,
                bytes_received = excluded.bytes_received, bytes_sent = excluded.bytes_sent
            RETURNING org_unit, username, (xmax = 0) AS fresh
        )
        SELECT array_agg(org_unit), array_agg(username) INTO ous, users FROM up WHERE fresh;
        IF ous IS NOT NULL THEN
            PERFORM pforte_bump(ous, users, 1);
        END IF;
    END IF;

    IF p_batch ? 'admit' THEN
        v_max := coalesce((lim->>'max_sessions')::integer, 0);
        v_reserved := coalesce((lim->>'reserved_seats')::integer, 0);
        v_per_user := coalesce((lim->>'max_sessions_per_user')::integer, 0);
        SELECT n INTO v_total FROM pforte_counts WHERE kind = 't' AND key = '';
        v_total := coalesce(v_total, 0);
        -- The common case: every candidate fits (seats, quotas, per-user limit even with all
        -- of them admitted). Deciding them one by one would admit them all, so they are.
        fits := v_total + n_all <= CASE WHEN n_general > 0 THEN v_max - v_reserved ELSE v_max END
            AND NOT EXISTS (
                SELECT 1 FROM (SELECT o AS ou, count(*) AS n FROM unnest(adm_ous) o GROUP BY 1) b
                LEFT JOIN pforte_counts k ON k.kind = 'o' AND k.key = b.ou
                WHERE coalesce((lim->'quotas'->>b.ou)::integer, 0) > 0
                  AND coalesce(k.n, 0) + b.n > (lim->'quotas'->>b.ou)::integer)
            AND (v_per_user = 0 OR NOT EXISTS (
                SELECT 1 FROM (SELECT u AS usr, count(*) AS n FROM unnest(adm_users) u GROUP BY 1) b
                LEFT JOIN pforte_counts k ON k.kind = 'u' AND k.key = b.usr
                WHERE coalesce(k.n, 0) + b.n > v_per_user));
        IF fits THEN
            PERFORM pforte_bump(adm_ous, adm_users, 1);
            results := array_fill('ok'::text, ARRAY[n_all]);
        ELSE
            -- In order, each against the counts as the ones before it left them.
            SELECT coalesce(jsonb_object_agg(key, n), '{}') INTO ou_n FROM pforte_counts
                WHERE kind = 'o' AND key = ANY (adm_ous);
            SELECT coalesce(jsonb_object_agg(key, n), '{}') INTO user_n FROM pforte_counts
                WHERE kind = 'u' AND key = ANY (adm_users);
            FOR c IN SELECT x, i FROM jsonb_array_elements(p_batch->'admit') WITH ORDINALITY AS t(x, i)
            LOOP
                ou := c.x->>'org_unit';
                usr := c.x->>'username';
                cap := CASE WHEN (c.x->>'priority')::boolean THEN v_max
                            ELSE greatest(v_max - v_reserved, 0) END;
                quota := coalesce((lim->'quotas'->>ou)::integer, 0);
                n_ou := coalesce((ou_n->>ou)::integer, 0);
                n_user := coalesce((user_n->>usr)::integer, 0);
                IF v_total >= cap THEN
                    results := results || 'capacity_full'::text;
                ELSIF quota > 0 AND n_ou >= quota THEN
                    results := results || 'org_unit_quota'::text;
                ELSIF v_per_user > 0 AND n_user >= v_per_user THEN
                    results := results || 'user_session_limit'::text;
                ELSE
                    results := results || 'ok'::text;
                    ok_idx := ok_idx || c.i;
                    v_total := v_total + 1;
                    ou_n := jsonb_set(ou_n, ARRAY[ou], to_jsonb(n_ou + 1));
                    user_n := jsonb_set(user_n, ARRAY[usr], to_jsonb(n_user + 1));
                END IF;
            END LOOP;
            DELETE FROM pforte_sessions WHERE id IN (
                SELECT x->>'id' FROM jsonb_array_elements(p_batch->'admit') WITH ORDINALITY AS t(x, i)
                 WHERE NOT (i = ANY (ok_idx)));
            IF cardinality(ok_idx) > 0 THEN
                SELECT array_agg(x->>'org_unit'), array_agg(x->>'username') INTO ous, users
                  FROM jsonb_array_elements(p_batch->'admit') WITH ORDINALITY AS t(x, i)
                 WHERE i = ANY (ok_idx);
                PERFORM pforte_bump(ous, users, 1);
            END IF;
        END IF;
    END IF;

    IF p_batch ? 'delete' THEN
        WITH d AS (
            DELETE FROM pforte_sessions
             WHERE id IN (SELECT jsonb_array_elements_text(p_batch->'delete'))
            RETURNING org_unit, username
        )
        SELECT array_agg(org_unit), array_agg(username) INTO ous, users FROM d;
        IF ous IS NOT NULL THEN
            PERFORM pforte_bump(ous, users, -1);
        END IF;
    END IF;

    IF p_batch ? 'bytes' THEN
        UPDATE pforte_sessions s SET bytes_received = b.rx, bytes_sent = b.tx
          FROM jsonb_to_recordset(p_batch->'bytes') AS b(id text, rx bigint, tx bigint)
         WHERE s.id = b.id;
    END IF;

    RETURN jsonb_build_object('admit', to_jsonb(results));
END
$f$;

-- Ends one session of any node (an API kill or a disconnect by id on another node): returns
-- it, or NULL if it is not live; its own node is told through pforte_kills.
CREATE FUNCTION pforte_end(p_id text, p_why text, p_node text) RETURNS jsonb
LANGUAGE plpgsql AS $f$
DECLARE
    out jsonb;
BEGIN
    PERFORM 1 FROM pforte_cluster WHERE id = 1 FOR UPDATE;
    WITH d AS (DELETE FROM pforte_sessions WHERE id = p_id RETURNING *)
    SELECT to_jsonb(d) INTO out FROM d;
    IF out IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pforte_bump(ARRAY[out->>'org_unit'], ARRAY[out->>'username'], -1);
    IF out->>'node' <> p_node THEN
        INSERT INTO pforte_kills (node, session_id, why) VALUES (out->>'node', p_id, p_why)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN out;
END
$f$;

-- Ends the sessions of every other node whose lease has lapsed; returns them. Their nodes,
-- if they come back, find them in pforte_kills and end them at their VPN servers.
CREATE FUNCTION pforte_expire(p_node text) RETURNS jsonb
LANGUAGE plpgsql AS $f$
DECLARE
    out jsonb;
    ous text[];
    users text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pforte_nodes n
                    WHERE n.lease_until < now() AND n.node <> p_node
                      AND EXISTS (SELECT 1 FROM pforte_sessions s WHERE s.node = n.node)) THEN
        RETURN '[]';
    END IF;
    PERFORM 1 FROM pforte_cluster WHERE id = 1 FOR UPDATE;
    WITH d AS (
        DELETE FROM pforte_sessions s USING pforte_nodes n
         WHERE s.node = n.node AND n.lease_until < now() AND n.node <> p_node
        RETURNING s.*
    )
    SELECT coalesce(jsonb_agg(to_jsonb(d)), '[]'), array_agg(org_unit), array_agg(username)
      INTO out, ous, users FROM d;
    IF ous IS NOT NULL THEN
        PERFORM pforte_bump(ous, users, -1);
        INSERT INTO pforte_kills (node, session_id, why)
            SELECT x->>'node', x->>'id', 'lease lapsed' FROM jsonb_array_elements(out) x
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN out;
END
$f$;
"#;

/// Creates or migrates the schema, under an advisory lock so that nodes starting together
/// migrate once. Returns the version in force.
pub(crate) async fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS pforte_schema (version integer NOT NULL)")
        .await
        .map_err(pg)?;
    let row = tx
        .query_one("SELECT max(version) FROM pforte_schema", &[])
        .await
        .map_err(pg)?;
    let mut version: i32 = row.get::<_, Option<i32>>(0).unwrap_or(0);
    let newest = MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0);
    if version > newest {
        return Err(StoreError::Postgres(format!(
            "the database's schema is version {version}, newer than this pforte knows ({newest}); upgrade pforte"
        )));
    }
    for (v, sql) in MIGRATIONS {
        if *v > version {
            tx.batch_execute(sql).await.map_err(pg)?;
            tracing::info!(version = v, "PostgreSQL schema migrated");
            version = *v;
        }
    }
    tx.execute("DELETE FROM pforte_schema", &[])
        .await
        .map_err(pg)?;
    tx.execute(
        "INSERT INTO pforte_schema (version) VALUES ($1)",
        &[&version],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    Ok(version)
}

/// A driver error as a store error, with the server's message where there is one.
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::Postgres(e.to_string()),
    }
}
