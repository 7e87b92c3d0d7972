-- The table deploy/pmacct/nfacctd-pgsql.conf writes: one row per connection 5-tuple, Antrea
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
