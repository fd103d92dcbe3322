//! `postgres_changes` filters: the PostgREST-style syntax realtime-js sends, parsed once and
//! evaluated against each change by the column's type.
//!
//! Syntax: `column=op.value`, conditions joined by `,` (AND). Operators: `eq`, `neq`, `lt`,
//! `lte`, `gt`, `gte`, `in.(a,b,…)` (at most 100 values), `is.null|not_null|true|false|unknown`,
//! `like` and `ilike` (`%` any run, `_` one character); any of them negated with `not.`
//! (`id=not.in.(1,2)`). Values with `,` `(` `)` `"` or `\` are double-quoted, with `\"` and `\\`
//! escapes inside quotes (`name=eq."Doe, Jane"`). An empty filter matches everything.
//!
//! Comparison follows the column type: integers, floats and numerics as numbers (numerics
//! exactly), booleans, timestamps/timestamptz/dates as instants (values without an offset are
//! UTC), UUIDs as 128-bit values; every other type compares its text output bytewise (C
//! collation). A NULL column matches no comparison, negated or not (SQL three-valued logic);
//! only `is` tests NULLs. Values are checked against the column type when a subscription is
//! made, so a bad value is refused up front.

use std::cmp::Ordering;

use super::types::Kind;
use crate::protocol::json::days_from_civil;

/// Largest number of values in an `in` list (Supabase's limit).
pub const MAX_IN_VALUES: usize = 100;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Is,
    Like,
    ILike,
}

impl Op {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "eq" => Self::Eq,
            "neq" => Self::Neq,
            "lt" => Self::Lt,
            "lte" => Self::Lte,
            "gt" => Self::Gt,
            "gte" => Self::Gte,
            "in" => Self::In,
            "is" => Self::Is,
            "like" => Self::Like,
            "ilike" => Self::ILike,
            _ => return None,
        })
    }
}

/// The argument of `is`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsValue {
    Null,
    NotNull,
    True,
    False,
    Unknown,
}

/// One condition: `column=[not.]op.value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cond {
    pub column: String,
    pub op: Op,
    pub negate: bool,
    /// Unquoted values (one, or the `in` list).
    pub values: Vec<String>,
    is: Option<IsValue>,
    /// Values parsed for the column's comparison class, once bound to a table.
    bound: Option<(Class, Vec<Typed>)>,
}

/// A parsed filter: every condition must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub conds: Vec<Cond>,
}

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter `{0}`: expected column=operator.value")]
    Syntax(String),
    #[error("invalid filter `{0}`: unknown operator `{1}` (use eq, neq, lt, lte, gt, gte, in, is, like, ilike)")]
    Operator(String, String),
    #[error("invalid filter `{0}`: `in` needs a parenthesized list like in.(1,2,3)")]
    InList(String),
    #[error("invalid filter `{0}`: `in` takes at most {MAX_IN_VALUES} values")]
    TooManyValues(String),
    #[error("invalid filter `{0}`: `is` takes null, not_null, true, false or unknown")]
    IsValue(String),
    #[error("invalid filter `{0}`: unbalanced quotes or parentheses")]
    Unbalanced(String),
    #[error("column `{column}` does not exist in {table}")]
    NoColumn { column: String, table: String },
    #[error("invalid value `{value}` for column `{column}` of type {typname}")]
    BadValue { value: String, column: String, typname: String },
}

/// How values of a column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Int,
    Float,
    Numeric,
    Bool,
    Timestamp,
    Timestamptz,
    Date,
    Uuid,
    Text,
}

impl Class {
    /// The comparison class of a kind (arrays and JSON compare as text).
    pub fn of(kind: &Kind) -> Self {
        match kind {
            Kind::Int => Self::Int,
            Kind::Float => Self::Float,
            Kind::Numeric => Self::Numeric,
            Kind::Bool => Self::Bool,
            Kind::Timestamp => Self::Timestamp,
            Kind::Timestamptz => Self::Timestamptz,
            Kind::Date => Self::Date,
            Kind::Uuid => Self::Uuid,
            Kind::Json | Kind::Bytea | Kind::Text | Kind::Array(_) => Self::Text,
        }
    }
}

/// A value parsed for comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Typed {
    Int(i128),
    Float(f64),
    Numeric(Dec),
    Bool(bool),
    /// Microseconds since the Unix epoch (dates at midnight UTC).
    Instant(i64),
    Uuid(u128),
    Text(Box<[u8]>),
}

/// What a filter sees of one column of a change.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    /// The column is not in the row (e.g. not part of a DELETE's replica identity).
    Missing,
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value: unknown, so no comparison holds.
    Unknown,
    /// Text output of a value of this kind.
    Value(&'a Kind, &'a [u8]),
}

impl Filter {
    /// Whether the filter has no conditions.
    pub fn is_empty(&self) -> bool {
        self.conds.is_empty()
    }

    /// Checks every column exists (`kind_of(column)` gives its kind and `typname`) and every
    /// value parses for its type, keeping the parsed values for evaluation.
    pub fn bind<'k>(
        &mut self,
        table: &str,
        kind_of: impl Fn(&str) -> Option<(&'k Kind, &'k str)>,
    ) -> Result<(), FilterError> {
        for c in &mut self.conds {
            let Some((kind, typname)) = kind_of(&c.column) else {
                return Err(FilterError::NoColumn { column: c.column.clone(), table: table.to_string() });
            };
            if matches!(c.op, Op::Is | Op::Like | Op::ILike) {
                continue;
            }
            let class = Class::of(kind);
            let mut typed = Vec::with_capacity(c.values.len());
            for v in &c.values {
                match parse_typed(class, v.as_bytes()) {
                    Some(t) => typed.push(t),
                    None => {
                        return Err(FilterError::BadValue {
                            value: v.clone(),
                            column: c.column.clone(),
                            typname: typname.to_string(),
                        })
                    }
                }
            }
            c.bound = Some((class, typed));
        }
        Ok(())
    }

    /// Whether a row passes: `cell(column)` gives each referenced column.
    pub fn matches<'a>(&self, cell: impl Fn(&str) -> Cell<'a>) -> bool {
        self.conds.iter().all(|c| c.matches(cell(&c.column)))
    }
}

impl Cond {
    fn matches(&self, cell: Cell<'_>) -> bool {
        if self.op == Op::Is {
            let is = self.is.unwrap_or(IsValue::Null);
            let r = match (is, cell) {
                (_, Cell::Missing | Cell::Unknown) => return false,
                (IsValue::Null | IsValue::Unknown, c) => matches!(c, Cell::Null),
                (IsValue::NotNull, c) => !matches!(c, Cell::Null),
                (IsValue::True, Cell::Value(_, v)) => parse_bool(v) == Some(true),
                (IsValue::False, Cell::Value(_, v)) => parse_bool(v) == Some(false),
                (IsValue::True | IsValue::False, _) => false,
            };
            return r != self.negate;
        }
        let Cell::Value(kind, raw) = cell else {
            return false;
        };
        let r = match self.op {
            Op::Like => like(raw, self.values[0].as_bytes(), false),
            Op::ILike => like(raw, self.values[0].as_bytes(), true),
            _ => {
                let class = Class::of(kind);
                let Some(v) = parse_typed(class, raw) else { return false };
                let cmp = |i: usize| -> Option<Ordering> {
                    match &self.bound {
                        Some((c, typed)) if *c == class => compare(&v, &typed[i]),
                        _ => compare(&v, &parse_typed(class, self.values[i].as_bytes())?),
                    }
                };
                let one = |pred: fn(Ordering) -> bool| cmp(0).is_some_and(pred);
                match self.op {
                    Op::Eq => one(Ordering::is_eq),
                    Op::Neq => one(Ordering::is_ne),
                    Op::Lt => one(Ordering::is_lt),
                    Op::Lte => one(Ordering::is_le),
                    Op::Gt => one(Ordering::is_gt),
                    Op::Gte => one(Ordering::is_ge),
                    Op::In => (0..self.values.len()).any(|i| cmp(i) == Some(Ordering::Equal)),
                    Op::Is | Op::Like | Op::ILike => unreachable!("handled above"),
                }
            }
        };
        r != self.negate
    }
}

/// Parses a filter string. An empty string gives an empty filter.
pub fn parse(s: &str) -> Result<Filter, FilterError> {
    let mut conds = Vec::new();
    if s.trim().is_empty() {
        return Ok(Filter { conds });
    }
    for part in split_top(s, ',').ok_or_else(|| FilterError::Unbalanced(s.to_string()))? {
        conds.push(parse_cond(part.trim())?);
    }
    Ok(Filter { conds })
}

fn parse_cond(part: &str) -> Result<Cond, FilterError> {
    let syntax = || FilterError::Syntax(part.to_string());
    let eq = find_top(part, b'=').ok_or_else(syntax)?;
    let column = unquote(part[..eq].trim()).ok_or_else(|| FilterError::Unbalanced(part.to_string()))?;
    if column.is_empty() {
        return Err(syntax());
    }
    let mut rest = &part[eq + 1..];
    let mut negate = false;
    if let Some(r) = rest.strip_prefix("not.") {
        negate = true;
        rest = r;
    }
    let (op_s, value) = rest.split_once('.').ok_or_else(syntax)?;
    let op = Op::parse(op_s).ok_or_else(|| FilterError::Operator(part.to_string(), op_s.to_string()))?;
    let mut is = None;
    let values = match op {
        Op::In => {
            let inner = value
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| FilterError::InList(part.to_string()))?;
            let items = split_top(inner, b',' as char).ok_or_else(|| FilterError::Unbalanced(part.to_string()))?;
            if items.len() > MAX_IN_VALUES {
                return Err(FilterError::TooManyValues(part.to_string()));
            }
            let mut vals = Vec::with_capacity(items.len());
            for it in items {
                vals.push(unquote(it.trim()).ok_or_else(|| FilterError::Unbalanced(part.to_string()))?);
            }
            if vals.is_empty() || (vals.len() == 1 && vals[0].is_empty() && inner.trim().is_empty()) {
                return Err(FilterError::InList(part.to_string()));
            }
            vals
        }
        Op::Is => {
            is = Some(match value.to_ascii_lowercase().as_str() {
                "null" => IsValue::Null,
                "not_null" => IsValue::NotNull,
                "true" => IsValue::True,
                "false" => IsValue::False,
                "unknown" => IsValue::Unknown,
                _ => return Err(FilterError::IsValue(part.to_string())),
            });
            vec![value.to_string()]
        }
        _ => vec![unquote(value).ok_or_else(|| FilterError::Unbalanced(part.to_string()))?],
    };
    Ok(Cond { column, op, negate, values, is, bound: None })
}

/// Splits on `sep` outside double quotes and parentheses; `None` if unbalanced.
fn split_top(s: &str, sep: char) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, ch) in s.char_indices() {
        if quoted {
            match ch {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' => quoted = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            c if c == sep && depth == 0 => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return None;
    }
    out.push(&s[start..]);
    Some(out)
}

/// Position of the first `b` outside double quotes.
fn find_top(s: &str, b: u8) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, &c) in s.as_bytes().iter().enumerate() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if c == b'"' {
            quoted = true;
        } else if c == b {
            return Some(i);
        }
    }
    None
}

/// Removes surrounding double quotes and `\` escapes; plain values are returned as they are.
fn unquote(s: &str) -> Option<String> {
    let Some(inner) = s.strip_prefix('"') else {
        return Some(s.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// SQL `LIKE`: `%` any run, `_` one character, `\` escapes the next character.
fn like(text: &[u8], pattern: &[u8], fold: bool) -> bool {
    let (Ok(t), Ok(p)) = (std::str::from_utf8(text), std::str::from_utf8(pattern)) else {
        return false;
    };
    let (t, p): (Vec<char>, Vec<char>) = if fold {
        (t.to_lowercase().chars().collect(), p.to_lowercase().chars().collect())
    } else {
        (t.chars().collect(), p.chars().collect())
    };
    // Iterative wildcard matching with backtracking to the last `%`.
    let (mut ti, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '%' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '_' => {
                    ti += 1;
                    pi += 1;
                    continue;
                }
                '\\' if pi + 1 < p.len() && p[pi + 1] == t[ti] => {
                    ti += 1;
                    pi += 2;
                    continue;
                }
                '\\' if pi + 1 < p.len() => {}
                c if c == t[ti] => {
                    ti += 1;
                    pi += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '%')
}

/// Orders two values of the same class (`None` across classes). Floats order NaN above
/// everything and equal to itself, as Postgres does.
pub fn compare(a: &Typed, b: &Typed) -> Option<Ordering> {
    Some(match (a, b) {
        (Typed::Int(x), Typed::Int(y)) => x.cmp(y),
        (Typed::Float(x), Typed::Float(y)) => match (x.is_nan(), y.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => x.partial_cmp(y)?,
        },
        (Typed::Numeric(x), Typed::Numeric(y)) => x.cmp(y),
        (Typed::Bool(x), Typed::Bool(y)) => x.cmp(y),
        (Typed::Instant(x), Typed::Instant(y)) => x.cmp(y),
        (Typed::Uuid(x), Typed::Uuid(y)) => x.cmp(y),
        (Typed::Text(x), Typed::Text(y)) => x.cmp(y),
        _ => return None,
    })
}

/// Parses a value (text output from the WAL, or a filter value) for `class`.
pub fn parse_typed(class: Class, raw: &[u8]) -> Option<Typed> {
    if class == Class::Text {
        return Some(Typed::Text(raw.into()));
    }
    let s = std::str::from_utf8(raw).ok()?.trim();
    Some(match class {
        Class::Int => Typed::Int(s.parse().ok()?),
        Class::Float => Typed::Float(s.parse().ok()?),
        Class::Numeric => Typed::Numeric(Dec::parse(s)?),
        Class::Bool => Typed::Bool(parse_bool(s.as_bytes())?),
        Class::Timestamp => Typed::Instant(parse_timestamp(s, false)?),
        Class::Timestamptz => Typed::Instant(parse_timestamp(s, true)?),
        Class::Date => Typed::Instant(parse_timestamp(s, false)?.div_euclid(DAY_MICROS) * DAY_MICROS),
        Class::Uuid => Typed::Uuid(parse_uuid(s)?),
        Class::Text => unreachable!("handled above"),
    })
}

fn parse_bool(v: &[u8]) -> Option<bool> {
    let s = std::str::from_utf8(v).ok()?.trim().to_ascii_lowercase();
    match s.as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn parse_uuid(s: &str) -> Option<u128> {
    let s = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')).unwrap_or(s);
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

const DAY_MICROS: i64 = 86_400_000_000;

/// `YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]]][ ][Z|UTC|±HH[[:]MM[[:]SS]]]`, or `±infinity`, as
/// microseconds since the Unix epoch. The offset is applied only when `tz` (timestamptz).
pub fn parse_timestamp(s: &str, tz: bool) -> Option<i64> {
    match s.to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let dash1 = s.find('-')?;
    if dash1 < 4 {
        return None;
    }
    let year = num(0..dash1)?;
    if year > 294_276 {
        // Beyond Postgres's timestamp range; also keeps the day arithmetic from overflowing.
        return None;
    }
    let month = num(dash1 + 1..dash1 + 3)? as u32;
    if b.get(dash1 + 3) != Some(&b'-') {
        return None;
    }
    let day = num(dash1 + 4..dash1 + 6)? as u32;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut micros = days_from_civil(year, month, day).checked_mul(DAY_MICROS)?;
    let mut i = dash1 + 6;
    if matches!(b.get(i), Some(b' ' | b'T' | b't')) && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i += 1;
        let h = num(i..i + 2)?;
        if b.get(i + 2) != Some(&b':') {
            return None;
        }
        let mi = num(i + 3..i + 5)?;
        i += 5;
        let mut sec = 0;
        if b.get(i) == Some(&b':') {
            sec = num(i + 1..i + 3)?;
            i += 3;
        }
        let mut frac = 0i64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            let digits = &s[start..i];
            if digits.is_empty() {
                return None;
            }
            let mut padded: String = digits.chars().take(6).collect();
            while padded.len() < 6 {
                padded.push('0');
            }
            frac = padded.parse().ok()?;
        }
        if h > 24 || mi > 59 || sec > 60 {
            return None;
        }
        micros = micros.checked_add(((h * 60 + mi) * 60 + sec) * 1_000_000 + frac)?;
    }
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    let rest = &s[i..];
    let offset = match rest {
        "" | "Z" | "z" | "UTC" | "utc" | "+00" | "-00" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits: String = rest[1..].chars().filter(|&c| c != ':').collect();
            if digits.is_empty()
                || digits.len() > 6
                || digits.len() % 2 == 1
                || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            let part = |k: usize| digits.get(k..k + 2).map_or(Some(0), |p| p.parse::<i64>().ok());
            sign * ((part(0)? * 60 + part(2)?) * 60 + part(4)?) * 1_000_000
        }
    };
    if tz {
        micros = micros.checked_sub(offset)?;
    }
    Some(micros)
}

/// An exact decimal: `0.d₁d₂… × 10^exp` with no leading or trailing zero digits, or a special
/// value. Ordered as Postgres orders numerics (NaN above everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dec {
    NegInf,
    Finite { neg: bool, exp: i64, digits: Box<[u8]> },
    PosInf,
    NaN,
}

impl Dec {
    /// Parses `[+-]digits[.digits][e[+-]digits]`, `NaN`, `[+-]Infinity`/`inf`.
    pub fn parse(s: &str) -> Option<Self> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "nan" => return Some(Self::NaN),
            "infinity" | "+infinity" | "inf" | "+inf" => return Some(Self::PosInf),
            "-infinity" | "-inf" => return Some(Self::NegInf),
            _ => {}
        }
        let b = s.as_bytes();
        let (neg, mut i) = match b.first()? {
            b'-' => (true, 1),
            b'+' => (false, 1),
            _ => (false, 0),
        };
        let mut digits = Vec::new();
        let mut point: Option<i64> = None;
        let mut seen = false;
        while let Some(&c) = b.get(i) {
            match c {
                b'0'..=b'9' => {
                    seen = true;
                    digits.push(c - b'0');
                }
                b'.' if point.is_none() => point = Some(digits.len() as i64),
                _ => break,
            }
            i += 1;
        }
        if !seen {
            return None;
        }
        let mut exp = point.unwrap_or(digits.len() as i64);
        if let Some(&(b'e' | b'E')) = b.get(i) {
            let e: i64 = s[i + 1..].parse().ok()?;
            exp = exp.checked_add(e)?;
            i = b.len();
        }
        if i != b.len() {
            return None;
        }
        let lead = digits.iter().take_while(|&&d| d == 0).count();
        digits.drain(..lead);
        exp -= lead as i64;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Self::Finite { neg: false, exp: 0, digits: Box::new([]) });
        }
        Some(Self::Finite { neg, exp, digits: digits.into_boxed_slice() })
    }
}

impl PartialOrd for Dec {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dec {
    fn cmp(&self, other: &Self) -> Ordering {
        fn rank(d: &Dec) -> u8 {
            match d {
                Dec::NegInf => 0,
                Dec::Finite { .. } => 1,
                Dec::PosInf => 2,
                Dec::NaN => 3,
            }
        }
        match (self, other) {
            (Dec::Finite { neg: an, exp: ae, digits: ad }, Dec::Finite { neg: bn, exp: be, digits: bd }) => {
                let sign = |neg: bool, d: &[u8]| {
                    if d.is_empty() {
                        0
                    } else if neg {
                        -1
                    } else {
                        1
                    }
                };
                let (sa, sb) = (sign(*an, ad), sign(*bn, bd));
                if sa != sb || sa == 0 {
                    return sa.cmp(&sb);
                }
                let mag = ae.cmp(be).then_with(|| ad.cmp(bd));
                if sa < 0 {
                    mag.reverse()
                } else {
                    mag
                }
            }
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Filter {
        parse(s).unwrap()
    }

    fn eval(filter: &Filter, cols: &[(&str, Kind, Option<&str>)]) -> bool {
        filter.matches(|name| match cols.iter().find(|c| c.0 == name) {
            None => Cell::Missing,
            Some((_, _, None)) => Cell::Null,
            Some((_, k, Some(v))) => Cell::Value(k, v.as_bytes()),
        })
    }

    #[test]
    fn parses_supabase_doctests() {
        let c = &f("subject=eq.hey").conds[0];
        assert_eq!(
            (c.column.as_str(), c.op, c.values.as_slice(), c.negate),
            ("subject", Op::Eq, &["hey".to_string()][..], false)
        );
        let c = &f("subject=in.(hidee,ho)").conds[0];
        assert_eq!(c.values, vec!["hidee", "ho"]);
        let c = &f("subject=not.like.hey%").conds[0];
        assert!(c.negate && c.op == Op::Like);
        assert_eq!(f("id=gt.0,id=lt.100").conds.len(), 2);
        assert!(matches!(parse("subject=foo.hey"), Err(FilterError::Operator(_, op)) if op == "foo"));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn quoting_and_in_lists() {
        let c = &f(r#"name=eq."Doe, Jane""#).conds[0];
        assert_eq!(c.values, vec!["Doe, Jane"]);
        let c = &f(r#"name=in.("a,b",c,"d\"e",  f )"#).conds[0];
        assert_eq!(c.values, vec!["a,b", "c", "d\"e", "f"]);
        let c = &f(r#""my col"=eq.1,b=is.NULL"#);
        assert_eq!(c.conds[0].column, "my col");
        assert_eq!(c.conds[1].is, Some(IsValue::Null));
        let hundred: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        assert!(parse(&format!("id=in.({})", hundred.join(","))).is_ok());
        let more: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        assert!(matches!(parse(&format!("id=in.({})", more.join(","))), Err(FilterError::TooManyValues(_))));
        for bad in ["id", "id=eq", "=eq.1", "id=in.1", "id=in.()", r#"a=eq."x"#, "a=in.(1", "a=is.maybe"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn typed_comparisons() {
        let int = Kind::Int;
        assert!(eval(&f("id=gt.9"), &[("id", int.clone(), Some("10"))]));
        // Text would say "10" < "9"; integers do not.
        assert!(!eval(&f("id=lt.9"), &[("id", int.clone(), Some("10"))]));
        assert!(eval(&f("id=in.(1,10,100)"), &[("id", int.clone(), Some("10"))]));
        assert!(eval(&f("id=not.in.(1,2)"), &[("id", int.clone(), Some("10"))]));
        assert!(eval(&f("id=gte.10,id=lte.10,id=neq.11"), &[("id", int.clone(), Some("10"))]));
        assert!(eval(&f("x=eq.1.50"), &[("x", Kind::Numeric, Some("1.5"))]));
        assert!(eval(&f("x=gt.99999999999999999999.1"), &[("x", Kind::Numeric, Some("99999999999999999999.2"))]));
        assert!(eval(&f("x=lt.-1e2"), &[("x", Kind::Numeric, Some("-100.5"))]));
        assert!(eval(&f("x=gt.0.5"), &[("x", Kind::Float, Some("0.75"))]));
        assert!(eval(&f("x=gt.1000"), &[("x", Kind::Float, Some("NaN"))]));
        assert!(eval(&f("done=eq.true"), &[("done", Kind::Bool, Some("t"))]));
        assert!(eval(&f("at=gt.2024-01-01"), &[("at", Kind::Timestamptz, Some("2024-01-01 00:00:01+00"))]));
        assert!(eval(
            &f("at=eq.2024-01-01T02:00:00+02:00"),
            &[("at", Kind::Timestamptz, Some("2024-01-01 00:00:00+00"))]
        ));
        assert!(eval(&f("d=lt.2024-02-01"), &[("d", Kind::Date, Some("2024-01-31"))]));
        assert!(eval(
            &f("u=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            &[("u", Kind::Uuid, Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"))]
        ));
        assert!(eval(&f("name=eq.Doe"), &[("name", Kind::Text, Some("Doe"))]));
        assert!(eval(&f("name=like.D%e"), &[("name", Kind::Text, Some("Doe"))]));
        assert!(eval(&f("name=ilike.d_E"), &[("name", Kind::Text, Some("Doe"))]));
        assert!(!eval(&f("name=like.D_"), &[("name", Kind::Text, Some("Doe"))]));
    }

    #[test]
    fn nulls_and_missing_columns() {
        let int = Kind::Int;
        for flt in ["id=eq.1", "id=neq.1", "id=not.eq.1", "id=in.(1)", "id=not.in.(1)"] {
            assert!(!eval(&f(flt), &[("id", int.clone(), None)]), "{flt}");
        }
        assert!(eval(&f("id=is.null"), &[("id", int.clone(), None)]));
        assert!(eval(&f("id=not.is.null"), &[("id", int.clone(), Some("1"))]));
        assert!(eval(&f("id=is.not_null"), &[("id", int.clone(), Some("1"))]));
        assert!(!eval(&f("other=eq.1"), &[("id", int, Some("1"))]));
        assert!(eval(&f("b=is.true"), &[("b", Kind::Bool, Some("t"))]));
        assert!(filter_unknown_is_false());
    }

    fn filter_unknown_is_false() -> bool {
        !f("x=eq.1").matches(|_| Cell::Unknown)
    }

    #[test]
    fn binding_checks_columns_and_values() {
        let int = Kind::Int;
        let cols = [("id", &int, "int4")];
        let lookup = |n: &str| cols.iter().find(|c| c.0 == n).map(|c| (c.1, c.2));
        let mut ok = f("id=in.(1,2)");
        ok.bind("public.t", lookup).unwrap();
        assert!(ok.conds[0].bound.is_some());
        assert!(matches!(f("nope=eq.1").bind("public.t", lookup), Err(FilterError::NoColumn { .. })));
        let e = f("id=eq.abc").bind("public.t", lookup).unwrap_err();
        assert_eq!(e.to_string(), "invalid value `abc` for column `id` of type int4");
    }

    #[test]
    fn decimals_and_timestamps() {
        let d = |s: &str| Dec::parse(s).unwrap();
        assert_eq!(d("1.50"), d("1.5"));
        assert_eq!(d("0"), d("-0.000"));
        assert!(d("-2") < d("-1") && d("-1") < d("0") && d("0") < d("0.001") && d("10") > d("9.99"));
        assert!(d("1e3") == d("1000") && d("NaN") > d("Infinity") && d("-Infinity") < d("-1e300"));
        assert!(Dec::parse("1.2.3").is_none() && Dec::parse("abc").is_none() && Dec::parse("-").is_none());
        assert_eq!(parse_timestamp("1970-01-01", false), Some(0));
        assert_eq!(parse_timestamp("1970-01-01 00:00:01.5", false), Some(1_500_000));
        assert_eq!(parse_timestamp("1970-01-01T01:00:00+01", true), Some(0));
        assert_eq!(parse_timestamp("1970-01-01 05:30:00+05:30", true), Some(0));
        assert_eq!(parse_timestamp("2000-01-01 00:00:00Z", true), Some(946_684_800_000_000));
        assert_eq!(parse_timestamp("infinity", true), Some(i64::MAX));
        for bad in ["2024", "2024-13-01", "2024-01-01 25", "2024-01-01 10:00 junk", "x"] {
            assert_eq!(parse_timestamp(bad, true), None, "{bad}");
        }
    }
}
