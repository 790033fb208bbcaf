-- What the source's catalog says of the mapped tables (cdc/catalog.py).

-- name: relations
-- Each (schema, name) given as two parallel arrays: kind, replica identity, whether a
-- primary key or an identity index exists, the live columns in order, the oid.
SELECT n.nspname, c.relname, c.relkind::text, c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       c.oid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(names)s::text[]))
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')

-- name: leaves
-- The same of every leaf partition of a partitioned table, at any depth.
SELECT n.nspname, c.relname, c.relkind::text, c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       c.oid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid IN (SELECT relid FROM pg_partition_tree(%(oid)s) WHERE isleaf)
ORDER BY c.oid

-- name: enum_labels
-- The labels of each enum-typed column of a table, in the enum's order.
SELECT a.attname::text, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
FROM pg_attribute a JOIN pg_enum e ON e.enumtypid = a.atttypid
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
GROUP BY a.attname ORDER BY a.attname

-- name: table_names
-- Every table a mapping could name, for a did-you-mean.
SELECT n.nspname || '.' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'

-- name: identity_index
SELECT ic.relname FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE n.nspname = %(schema)s AND c.relname = %(name)s AND i.indisreplident

-- name: partition_ancestors
-- A table (as wal2json names it: schema.name) and its ancestors, itself first.
SELECT an.nspname || '.' || a.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     LATERAL pg_partition_ancestors(c.oid) WITH ORDINALITY AS p(relid, depth)
JOIN pg_class a ON a.oid = p.relid JOIN pg_namespace an ON an.oid = a.relnamespace
WHERE n.nspname || '.' || c.relname = %(table)s AND c.relkind IN ('r', 'p')
ORDER BY p.depth

-- name: key_columns
-- The columns a backfill reads a table in order of: the key the WAL identifies its rows by
-- (under REPLICA IDENTITY USING INDEX that index, else the primary key, else an identity
-- index), with each column's type, to cast a stored key back.
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos) ON true
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE n.nspname = %(schema)s AND c.relname = %(name)s
  AND i.indexrelid = (SELECT i2.indexrelid FROM pg_index i2 WHERE i2.indrelid = c.oid
                      AND (i2.indisprimary OR i2.indisreplident)
                      ORDER BY (CASE WHEN c.relreplident = 'i' THEN i2.indisreplident
                                     ELSE i2.indisprimary END) DESC
                      LIMIT 1)
ORDER BY k.pos

-- name: column_types
-- Every column type of a table by oid and name, a domain's as its base type's.
SELECT DISTINCT t.oid, coalesce(b.typname, t.typname)::text, b.oid
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
WHERE n.nspname = %(schema)s AND c.relname = %(name)s AND a.attnum > 0 AND NOT a.attisdropped
