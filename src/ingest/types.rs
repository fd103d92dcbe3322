//! Postgres types as corecast needs them: the `typname` clients see in `columns`, how a text
//! value becomes JSON ([`Kind`]) and how filters compare it.
//!
//! Builtin types are known up front; others (domains, enums, arrays of them, extension types)
//! are resolved from `pg_type` by the ingest and added with [`Types::insert`].

use std::collections::HashMap;
use std::sync::Arc;

/// How a column's text output becomes JSON (the shape `to_jsonb` gives), and how filters
/// compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// int2, int4, int8, oid: JSON numbers; compared as integers.
    Int,
    /// float4, float8: JSON numbers (`"NaN"`, `"Infinity"` as strings); compared as floats.
    Float,
    /// numeric: JSON numbers (`NaN`/`Infinity` as strings); compared exactly as decimals.
    Numeric,
    /// bool: `true`/`false`.
    Bool,
    /// json, jsonb: embedded as JSON; compared as text.
    Json,
    /// bytea: hex string without the `\x` prefix (as Supabase sends it); compared as text.
    Bytea,
    /// timestamp: ISO 8601 string with `T`; compared as instants.
    Timestamp,
    /// timestamptz: ISO 8601 string with `T` and `+HH:MM`; compared as instants.
    Timestamptz,
    /// date: string; compared as dates.
    Date,
    /// uuid: string; compared as 128-bit values.
    Uuid,
    /// Everything else: the text output as a JSON string; compared bytewise (C collation).
    Text,
    /// An array of the element kind: JSON array (nested for several dimensions).
    Array(Box<Kind>),
}

/// What corecast knows about one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// `pg_type.typname` (e.g. `int4`, `_text`, `timestamptz`): the `type` in `columns`.
    pub name: Arc<str>,
    pub kind: Kind,
}

/// The known types, by OID.
#[derive(Debug, Clone)]
pub struct Types {
    by_oid: HashMap<u32, TypeInfo>,
}

const BUILTIN: &[(u32, &str, Kind)] = &[
    (16, "bool", Kind::Bool),
    (17, "bytea", Kind::Bytea),
    (18, "char", Kind::Text),
    (19, "name", Kind::Text),
    (20, "int8", Kind::Int),
    (21, "int2", Kind::Int),
    (23, "int4", Kind::Int),
    (25, "text", Kind::Text),
    (26, "oid", Kind::Int),
    (114, "json", Kind::Json),
    (142, "xml", Kind::Text),
    (650, "cidr", Kind::Text),
    (700, "float4", Kind::Float),
    (701, "float8", Kind::Float),
    (790, "money", Kind::Text),
    (829, "macaddr", Kind::Text),
    (869, "inet", Kind::Text),
    (1042, "bpchar", Kind::Text),
    (1043, "varchar", Kind::Text),
    (1082, "date", Kind::Date),
    (1083, "time", Kind::Text),
    (1114, "timestamp", Kind::Timestamp),
    (1184, "timestamptz", Kind::Timestamptz),
    (1186, "interval", Kind::Text),
    (1266, "timetz", Kind::Text),
    (1560, "bit", Kind::Text),
    (1562, "varbit", Kind::Text),
    (1700, "numeric", Kind::Numeric),
    (2950, "uuid", Kind::Uuid),
    (3614, "tsvector", Kind::Text),
    (3802, "jsonb", Kind::Json),
];

/// Builtin array types: (array oid, typname, element oid).
const BUILTIN_ARRAYS: &[(u32, &str, u32)] = &[
    (1000, "_bool", 16),
    (1001, "_bytea", 17),
    (1002, "_char", 18),
    (1003, "_name", 19),
    (1005, "_int2", 21),
    (1007, "_int4", 23),
    (1009, "_text", 25),
    (1014, "_bpchar", 1042),
    (1015, "_varchar", 1043),
    (1016, "_int8", 20),
    (1021, "_float4", 700),
    (1022, "_float8", 701),
    (1028, "_oid", 26),
    (1041, "_inet", 869),
    (1115, "_timestamp", 1114),
    (1182, "_date", 1082),
    (1183, "_time", 1083),
    (1185, "_timestamptz", 1184),
    (1187, "_interval", 1186),
    (1231, "_numeric", 1700),
    (199, "_json", 114),
    (2951, "_uuid", 2950),
    (3807, "_jsonb", 3802),
];

/// A row of `pg_type` as the catalog lookup returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogType {
    pub oid: u32,
    pub name: String,
    /// `typtype`: `b` base, `d` domain, `e` enum, `c` composite, `r` range, `m` multirange.
    pub typtype: u8,
    /// Base type of a domain (0 otherwise).
    pub base: u32,
    /// Element type of an array (0 otherwise).
    pub elem: u32,
    /// `typcategory` (`A` for arrays).
    pub category: u8,
}

impl Default for Types {
    fn default() -> Self {
        Self::new()
    }
}

impl Types {
    /// The builtin types.
    pub fn new() -> Self {
        let mut by_oid = HashMap::new();
        for (oid, name, kind) in BUILTIN {
            by_oid.insert(*oid, TypeInfo { name: Arc::from(*name), kind: kind.clone() });
        }
        for &(oid, name, elem) in BUILTIN_ARRAYS {
            let ek = by_oid.get(&elem).map_or(Kind::Text, |t: &TypeInfo| t.kind.clone());
            by_oid.insert(oid, TypeInfo { name: Arc::from(name), kind: Kind::Array(Box::new(ek)) });
        }
        Self { by_oid }
    }

    /// The type with `oid`, if known.
    pub fn get(&self, oid: u32) -> Option<&TypeInfo> {
        self.by_oid.get(&oid)
    }

    /// The kind of `oid`, `Text` when unknown.
    pub fn kind(&self, oid: u32) -> &Kind {
        static TEXT: Kind = Kind::Text;
        self.by_oid.get(&oid).map_or(&TEXT, |t| &t.kind)
    }

    /// Whether `oid` is known.
    pub fn contains(&self, oid: u32) -> bool {
        self.by_oid.contains_key(&oid)
    }

    /// Adds types read from `pg_type`. Domains take their base type's kind, arrays their
    /// element's; a base or element not in `rows` nor known yet makes the type `Text`, so call
    /// with the whole closure (see [`Types::needed`]).
    pub fn insert(&mut self, rows: &[CatalogType]) {
        let by: HashMap<u32, &CatalogType> = rows.iter().map(|r| (r.oid, r)).collect();
        for r in rows {
            let kind = self.resolve(r.oid, &by, 0);
            self.by_oid.insert(r.oid, TypeInfo { name: Arc::from(r.name.as_str()), kind });
        }
    }

    fn resolve(&self, oid: u32, rows: &HashMap<u32, &CatalogType>, depth: u32) -> Kind {
        if let Some(t) = self.by_oid.get(&oid) {
            return t.kind.clone();
        }
        let Some(r) = rows.get(&oid) else { return Kind::Text };
        if depth > 8 {
            return Kind::Text;
        }
        if r.typtype == b'd' && r.base != 0 {
            return self.resolve(r.base, rows, depth + 1);
        }
        if r.category == b'A' && r.elem != 0 {
            return Kind::Array(Box::new(self.resolve(r.elem, rows, depth + 1)));
        }
        Kind::Text
    }

    /// OIDs referenced by `rows` (domain bases, array elements) that are neither known nor in
    /// `rows`: look these up too before calling [`Types::insert`].
    pub fn needed(&self, rows: &[CatalogType]) -> Vec<u32> {
        let mut out: Vec<u32> = rows
            .iter()
            .flat_map(|r| [r.base, r.elem])
            .filter(|&o| o != 0 && !self.contains(o) && !rows.iter().any(|r| r.oid == o))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_and_catalog_types() {
        let mut t = Types::new();
        assert_eq!(&*t.get(23).unwrap().name, "int4");
        assert_eq!(t.kind(1007), &Kind::Array(Box::new(Kind::Int)));
        assert_eq!(t.kind(99999), &Kind::Text);
        let rows = vec![
            CatalogType { oid: 5000, name: "posint".into(), typtype: b'd', base: 20, elem: 0, category: b'N' },
            CatalogType { oid: 5001, name: "_posint".into(), typtype: b'b', base: 0, elem: 5000, category: b'A' },
            CatalogType { oid: 5002, name: "mood".into(), typtype: b'e', base: 0, elem: 0, category: b'E' },
            CatalogType { oid: 5003, name: "d2".into(), typtype: b'd', base: 6000, elem: 0, category: b'S' },
        ];
        assert_eq!(t.needed(&rows), vec![6000]);
        t.insert(&rows);
        assert_eq!(t.kind(5000), &Kind::Int);
        assert_eq!(&*t.get(5000).unwrap().name, "posint");
        assert_eq!(t.kind(5001), &Kind::Array(Box::new(Kind::Int)));
        assert_eq!(t.kind(5002), &Kind::Text);
        assert_eq!(t.kind(5003), &Kind::Text);
    }
}
