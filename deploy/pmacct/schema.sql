-- The tables deploy/pmacct/nfacctd-pgsql.conf writes. antrea_flows: one row per connection 5-tuple, Antrea
-- fields and minute (stamp_inserted), with the bytes and packets of the originating
-- direction summed over the records (octetDeltaCount, packetDeltaCount). Column names are
-- pmacct's for its own primitives and the primitive names of primitives.lst for Antrea's.
--   psql -d pmacct -f schema.sql      (as the database's owner; docs/collectors.md)
-- nfacctd's role (pmacct, as nfacctd-pgsql.conf's sql_user) gets what it needs and no more.

CREATE TABLE IF NOT EXISTS antrea_flows (
    -- text, not inet: nfacctd writes '' for a record without addresses (ovsflow's deny
    -- totals, template 270), which inet refuses, and a refused row costs the whole write
    -- (every row of the minute). Cast for address operators: ip_src::inet << '10.0.0.0/8'.
    ip_src text NOT NULL,
    ip_dst text NOT NULL,
    port_src integer NOT NULL,
    port_dst integer NOT NULL,
    ip_proto smallint NOT NULL,
    -- Antrea's fields: '' (and 0) where the record has none, e.g. the Pod of another node
    source_pod_namespace text NOT NULL DEFAULT '',
    source_pod_name text NOT NULL DEFAULT '',
    destination_pod_namespace text NOT NULL DEFAULT '',
    destination_pod_name text NOT NULL DEFAULT '',
    source_node_name text NOT NULL DEFAULT '',
    destination_node_name text NOT NULL DEFAULT '',
    flow_type smallint NOT NULL DEFAULT 0,  -- 1 intra-node, 2 inter-node, 3 to, 4 from external
    ingress_rule_name text NOT NULL DEFAULT '',
    ingress_rule_action smallint NOT NULL DEFAULT 0,  -- 1 allow, 2 drop, 3 reject
    egress_rule_name text NOT NULL DEFAULT '',
    egress_rule_action smallint NOT NULL DEFAULT 0,
    packets bigint NOT NULL,
    bytes bigint NOT NULL,
    stamp_inserted timestamp without time zone NOT NULL,  -- the minute (sql_history: 1m)
    stamp_updated timestamp without time zone,
    PRIMARY KEY (stamp_inserted, ip_src, ip_dst, port_src, port_dst, ip_proto,
                 source_pod_namespace, source_pod_name, destination_pod_namespace,
                 destination_pod_name, source_node_name, destination_node_name, flow_type,
                 ingress_rule_name, ingress_rule_action, egress_rule_name, egress_rule_action)
);
GRANT SELECT, INSERT, UPDATE ON antrea_flows TO pmacct;

-- Bytes by source Pod and destination Pod. A node names only its own Pods: a connection
-- between two nodes comes from both, the source node naming the source Pod, the destination
-- node the destination Pod. The view joins the two by the connection's 5-tuple (as Antrea's
-- Flow Aggregator correlates them) and counts the bytes once, as the source Pod's node
-- counted them; where the source is not a Pod, as the destination Pod's node did. Rows
-- without addresses are deny totals (per rule or Pod, not connections): left out.
CREATE OR REPLACE VIEW pod_bytes AS
WITH connections AS (
    SELECT max(source_pod_namespace) AS source_pod_namespace,
           max(source_pod_name) AS source_pod_name,
           max(destination_pod_namespace) AS destination_pod_namespace,
           max(destination_pod_name) AS destination_pod_name,
           coalesce(sum(bytes) FILTER (WHERE source_pod_name <> ''), sum(bytes)) AS bytes,
           coalesce(sum(packets) FILTER (WHERE source_pod_name <> ''), sum(packets))
               AS packets
    FROM antrea_flows
    WHERE ip_src <> ''
    GROUP BY ip_src, ip_dst, port_src, port_dst, ip_proto
)
SELECT source_pod_namespace, source_pod_name, destination_pod_namespace,
       destination_pod_name, sum(bytes)::bigint AS bytes, sum(packets)::bigint AS packets,
       count(*) AS connections
FROM connections
GROUP BY source_pod_namespace, source_pod_name, destination_pod_namespace,
         destination_pod_name;

-- ovsflow's ledger (docs/ipfix.md, "The completeness ledger"): one row per options record
-- an agent sent, with the exporter's address (peer_ip_src). Rows with an exporting process
-- (metering_process_id 0) count what that agent exported to this collector and what it did
-- not send (records dropped while the collector was away, or rejected); rows with a metering
-- process (exporting_process_id 0) what the agent never turned into records: 1, the
-- conntrack poller's connections not tracked; 2, the deny path's packets its meter dropped.
-- Counters are totals since system_init_ms (milliseconds since 1970): a row with another
-- system_init_ms is a restarted agent, counting from 0 again.
CREATE TABLE IF NOT EXISTS ovsflow_ledger (
    peer_ip_src inet NOT NULL,
    observation_domain_id bigint NOT NULL,
    exporting_process_id bigint NOT NULL,
    metering_process_id bigint NOT NULL,
    exported_messages bigint NOT NULL,
    exported_octets bigint NOT NULL,
    exported_flow_records bigint NOT NULL,
    not_sent_flow_records bigint NOT NULL,
    ignored_data_records bigint NOT NULL,
    ignored_packets bigint NOT NULL,
    system_init_ms bigint NOT NULL,
    observation_ms bigint NOT NULL,
    packets bigint,  -- pmacct's counters, meaningless here
    bytes bigint,
    stamp_inserted timestamp without time zone NOT NULL,
    stamp_updated timestamp without time zone,
    PRIMARY KEY (stamp_inserted, peer_ip_src, observation_domain_id, exporting_process_id,
                 metering_process_id, system_init_ms, observation_ms)
);
GRANT SELECT, INSERT, UPDATE ON ovsflow_ledger TO pmacct;

-- What each agent has not delivered here, as its latest ledger says: one row per agent
-- (exporter address and observation domain) and run (system_init_ms).
CREATE OR REPLACE VIEW ovsflow_completeness AS
SELECT DISTINCT ON (peer_ip_src, observation_domain_id, system_init_ms)
       host(peer_ip_src) AS exporter, observation_domain_id,
       to_timestamp(system_init_ms / 1000.0) AS counting_since,
       to_timestamp(observation_ms / 1000.0) AS as_of,
       exported_flow_records, not_sent_flow_records,
       (SELECT max(ignored_data_records) FROM ovsflow_ledger m
        WHERE (m.peer_ip_src, m.observation_domain_id, m.system_init_ms, m.metering_process_id)
            = (l.peer_ip_src, l.observation_domain_id, l.system_init_ms, 1))
           AS connections_not_tracked,
       (SELECT max(ignored_packets) FROM ovsflow_ledger m
        WHERE (m.peer_ip_src, m.observation_domain_id, m.system_init_ms, m.metering_process_id)
            = (l.peer_ip_src, l.observation_domain_id, l.system_init_ms, 2))
           AS denied_packets_not_seen
FROM ovsflow_ledger l
WHERE metering_process_id = 0
ORDER BY peer_ip_src, observation_domain_id, system_init_ms, observation_ms DESC;
