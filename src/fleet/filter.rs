//! Device filters in the query language hawkBit's target filters use (FIQL/RSQL):
//!
//! ```text
//! tag==release;hardware==nrf52          both (`;` or ` and `)
//! group==eu,group==us                   either (`,` or ` or `); `;` binds tighter
//! (tag==a,tag==b);version.bios=lt=2.0   parentheses
//! id==cid-*                             `*` matches any run of characters
//! version=in=(1.0,1.1)  lastseen=ge=1767225600
//! ```
//!
//! Fields: `id`, `tag`, `group` (any of the device's groups), `production` (`true`/`false`),
//! `hardware`, `version` (the `main` component's running version) or `version.COMPONENT`, and
//! `lastseen` (Unix seconds, or an RFC 3339 time). Operators: `==` `!=` `=lt=` `=le=` `=gt=`
//! `=ge=` (also `<` `<=` `>` `>=`) `=in=` `=out=`. Versions order as releases do (semver where
//! both sides parse); other text orders as bytes. A device without the attribute (no tag, no
//! version reported) matches only `!=` and `=out=`. The syntax is parsed with winnow; an error
//! names its position (0-based, in characters) and what was expected there.

use std::ops::Range;

use winnow::ascii::{multispace0, multispace1};
use winnow::combinator::{alt, cut_err, delimited, eof, preceded, repeat, separated, terminated};
use winnow::error::{ContextError, StrContext, StrContextValue};
use winnow::prelude::*;
use winnow::stream::LocatingSlice;
use winnow::token::{take_till, take_while};

use super::Device;
use crate::firmware::version_order;

/// A filter that does not parse, or names something that is not there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter position {position}: {message}")]
pub struct FilterError {
    /// 0-based, in characters.
    pub position: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Out,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Id,
    Tag,
    Group,
    Production,
    Hardware,
    /// The running version of this component.
    Version(String),
    LastSeen,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Bool(bool),
    Time(i64),
}

/// A parsed, checked filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Cmp { field: Field, op: Op, values: Vec<Value> },
}

/// The syntax tree, with the spans errors point at.
enum Raw {
    All(Vec<Raw>),
    Any(Vec<Raw>),
    Cmp { selector: (String, Range<usize>), op: Op, values: Vec<(String, Range<usize>)> },
}

type In<'a> = LocatingSlice<&'a str>;

fn expected(what: &'static str) -> StrContext {
    StrContext::Expected(StrContextValue::Description(what))
}

/// `first (sep next)*`, where a separator must be followed by what it separates.
fn chain(
    i: &mut In<'_>,
    part: fn(&mut In<'_>) -> ModalResult<Raw>,
    symbol: char,
    word: &'static str,
) -> ModalResult<Vec<Raw>> {
    let first = part(i)?;
    let sep = alt(((multispace0, symbol, multispace0).void(), (multispace1, word, multispace1).void()));
    let rest: Vec<Raw> = repeat(0.., preceded(sep, cut_err(part))).parse_next(i)?;
    Ok(std::iter::once(first).chain(rest).collect())
}

fn or_expr(i: &mut In<'_>) -> ModalResult<Raw> {
    let mut parts = chain(i, and_expr, ',', "or")?;
    Ok(if parts.len() == 1 { parts.remove(0) } else { Raw::Any(parts) })
}

fn and_expr(i: &mut In<'_>) -> ModalResult<Raw> {
    let mut parts = chain(i, constraint, ';', "and")?;
    Ok(if parts.len() == 1 { parts.remove(0) } else { Raw::All(parts) })
}

fn constraint(i: &mut In<'_>) -> ModalResult<Raw> {
    alt((
        delimited(('(', multispace0), cut_err(or_expr), cut_err((multispace0, ')')).context(expected("`)`"))),
        comparison,
    ))
    .parse_next(i)
}

fn comparison(i: &mut In<'_>) -> ModalResult<Raw> {
    let selector = take_while(1.., |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .with_span()
        .context(expected("a field name"))
        .parse_next(i)?;
    let op = cut_err(comparator).parse_next(i)?;
    let values = cut_err(arguments).parse_next(i)?;
    Ok(Raw::Cmp { selector: (selector.0.to_owned(), selector.1), op, values })
}

fn comparator(i: &mut In<'_>) -> ModalResult<Op> {
    alt((
        "==".value(Op::Eq),
        "!=".value(Op::Ne),
        "=lt=".value(Op::Lt),
        "=le=".value(Op::Le),
        "=gt=".value(Op::Gt),
        "=ge=".value(Op::Ge),
        "=in=".value(Op::In),
        "=out=".value(Op::Out),
        "<=".value(Op::Le),
        ">=".value(Op::Ge),
        "<".value(Op::Lt),
        ">".value(Op::Gt),
    ))
    .context(expected("an operator (== != =lt= =le= =gt= =ge= =in= =out=)"))
    .parse_next(i)
}

fn arguments(i: &mut In<'_>) -> ModalResult<Vec<(String, Range<usize>)>> {
    alt((
        delimited(
            ('(', multispace0),
            cut_err(separated(1.., value, (multispace0, ',', multispace0))),
            cut_err((multispace0, ')')).context(expected("`,` or `)`")),
        ),
        value.map(|v| vec![v]),
    ))
    .parse_next(i)
}

fn value(i: &mut In<'_>) -> ModalResult<(String, Range<usize>)> {
    let quoted =
        |q: char| delimited(q, take_till(0.., move |c| c == q), cut_err(q).context(expected("a closing quote")));
    alt((
        quoted('"'),
        quoted('\''),
        take_while(1.., |c: char| {
            !c.is_whitespace() && !matches!(c, '"' | '\'' | '(' | ')' | ';' | ',' | '=' | '!' | '~' | '<' | '>')
        }),
    ))
    .with_span()
    .map(|(s, r): (&str, Range<usize>)| (s.to_owned(), r))
    .context(expected("a value"))
    .parse_next(i)
}

fn query(i: &mut In<'_>) -> ModalResult<Raw> {
    terminated(preceded(multispace0, or_expr), (multispace0, cut_err(eof).context(expected("`;`, `,` or the end"))))
        .parse_next(i)
}

/// Character position of byte offset `at` in `text`.
fn position(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].chars().count()
}

fn describe(e: &ContextError) -> String {
    let wanted: Vec<String> = e
        .context()
        .filter_map(|c| match c {
            StrContext::Expected(StrContextValue::Description(d)) => Some((*d).to_owned()),
            StrContext::Expected(StrContextValue::StringLiteral(s)) => Some(format!("`{s}`")),
            StrContext::Expected(StrContextValue::CharLiteral(c)) => Some(format!("`{c}`")),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        "unexpected input".into()
    } else {
        format!("expected {}", wanted.join(" or "))
    }
}

const FIELDS: &str = "id, tag, group, production, hardware, version, version.COMPONENT, lastseen";

impl Filter {
    /// Parses and checks `text`.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        if text.trim().is_empty() {
            return Err(FilterError { position: 0, message: "empty filter".into() });
        }
        let raw = query
            .parse(LocatingSlice::new(text))
            .map_err(|e| FilterError { position: position(text, e.offset()), message: describe(e.inner()) })?;
        compile(text, raw)
    }

    /// Whether `d` matches.
    pub fn matches(&self, d: &Device) -> bool {
        match self {
            Filter::All(fs) => fs.iter().all(|f| f.matches(d)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(d)),
            Filter::Cmp { field, op, values } => compare(field, *op, values, d),
        }
    }
}

fn compile(text: &str, raw: Raw) -> Result<Filter, FilterError> {
    Ok(match raw {
        Raw::All(v) => Filter::All(v.into_iter().map(|r| compile(text, r)).collect::<Result<_, _>>()?),
        Raw::Any(v) => Filter::Any(v.into_iter().map(|r| compile(text, r)).collect::<Result<_, _>>()?),
        Raw::Cmp { selector: (name, span), op, values } => {
            let at = |r: &Range<usize>, message: String| FilterError { position: position(text, r.start), message };
            let field = match name.as_str() {
                "id" => Field::Id,
                "tag" => Field::Tag,
                "group" => Field::Group,
                "production" => Field::Production,
                "hardware" => Field::Hardware,
                "version" => Field::Version("main".into()),
                "lastseen" => Field::LastSeen,
                other => match other.strip_prefix("version.") {
                    Some(c) if !c.is_empty() => Field::Version(c.into()),
                    _ => return Err(at(&span, format!("unknown field {other:?}: expected one of {FIELDS}"))),
                },
            };
            let list = matches!(op, Op::In | Op::Out);
            if !list && values.len() != 1 {
                return Err(at(&values[1].1, format!("{name} takes one value with this operator; =in= takes a list")));
            }
            let ordering = matches!(op, Op::Lt | Op::Le | Op::Gt | Op::Ge);
            let mut out = Vec::with_capacity(values.len());
            for (v, r) in &values {
                out.push(match field {
                    Field::Production => {
                        if ordering {
                            return Err(at(&span, "production is true or false: use == or !=".into()));
                        }
                        match v.as_str() {
                            "true" => Value::Bool(true),
                            "false" => Value::Bool(false),
                            _ => return Err(at(r, format!("expected true or false, not {v:?}"))),
                        }
                    }
                    Field::LastSeen => Value::Time(
                        crate::parse_moment(v)
                            .ok_or_else(|| at(r, format!("expected Unix seconds or an RFC 3339 time, not {v:?}")))?,
                    ),
                    Field::Version(_) if ordering && version_order(v).is_none() => {
                        return Err(at(r, format!("{v:?} is not a version to order by (1.2.3, 1.2 or 7)")));
                    }
                    _ => Value::Text(v.clone()),
                });
            }
            Filter::Cmp { field, op, values: out }
        }
    })
}

/// `*` in `pattern` matches any run of characters; everything else itself.
fn wildcard(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for p in middle {
        match rest.find(p) {
            Some(at) => rest = &rest[at + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn order(field: &Field, a: &str, b: &str) -> Option<std::cmp::Ordering> {
    match field {
        Field::Version(_) => Some(version_order(a)?.cmp(&version_order(b)?)),
        _ => Some(a.cmp(b)),
    }
}

fn compare(field: &Field, op: Op, values: &[Value], d: &Device) -> bool {
    match field {
        Field::Production => {
            let want = values.iter().any(|v| *v == Value::Bool(d.spec.production));
            return if op == Op::Ne { !want } else { want };
        }
        Field::LastSeen => {
            let Some(seen) = d.last_seen.map(|s| s as i64) else { return matches!(op, Op::Ne | Op::Out) };
            let hit = |v: &Value| matches!(v, Value::Time(t) if *t == seen);
            let Some(Value::Time(t)) = values.first() else { return false };
            return match op {
                Op::Eq => hit(&values[0]),
                Op::Ne => !hit(&values[0]),
                Op::Lt => seen < *t,
                Op::Le => seen <= *t,
                Op::Gt => seen > *t,
                Op::Ge => seen >= *t,
                Op::In => values.iter().any(hit),
                Op::Out => !values.iter().any(hit),
            };
        }
        _ => {}
    }
    let have: Vec<&str> = match field {
        Field::Id => vec![d.spec.id.as_str()],
        Field::Tag => d.spec.tag.as_deref().into_iter().collect(),
        Field::Group => d.spec.groups.iter().map(String::as_str).collect(),
        Field::Hardware => d.spec.hardware.as_deref().into_iter().collect(),
        Field::Version(c) => d.running.get(c).map(String::as_str).into_iter().collect(),
        Field::Production | Field::LastSeen => unreachable!("handled above"),
    };
    let texts: Vec<&str> = values
        .iter()
        .filter_map(|v| match v {
            Value::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let any_equal = || texts.iter().any(|p| have.iter().any(|h| wildcard(p, h)));
    match op {
        Op::Eq | Op::In => any_equal(),
        Op::Ne | Op::Out => !any_equal(),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let Some(want) = texts.first() else { return false };
            have.iter().any(|h| match order(field, h, want) {
                Some(o) => match op {
                    Op::Lt => o.is_lt(),
                    Op::Le => o.is_le(),
                    Op::Gt => o.is_gt(),
                    _ => o.is_ge(),
                },
                None => false,
            })
        }
    }
}

#[cfg(test)]
mod tests;
