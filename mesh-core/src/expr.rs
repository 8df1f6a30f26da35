//! Attribute expressions of Istio's Telemetry API, the small part of CEL that access-log
//! filters (`response.code >= 500 && request.method == 'POST'`) and metric tag values
//! (`request.host`, `request.headers['x-user']`, `'literal'`) use: attributes, string and
//! integer literals, the six comparisons, `&&`, `||`, `!` and parentheses. One parser for the
//! controller (which reports what it cannot read) and the proxies (which evaluate). Input is
//! bounded (`MAX_LEN`) and parsing is not recursive beyond `MAX_DEPTH`, since the text comes
//! from users' YAML.

use std::borrow::Cow;

/// Longest expression accepted.
pub const MAX_LEN: usize = 1024;
/// Deepest nesting of parentheses and `!`.
pub const MAX_DEPTH: usize = 16;

/// An attribute of a request the proxies know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    ResponseCode,
    RequestMethod,
    RequestPath,
    RequestHost,
    RequestProtocol,
    RequestHeader(String),
    SourcePrincipal,
    SourceNamespace,
    SourceWorkload,
    DestinationServiceName,
    DestinationServiceHost,
    DestinationServiceNamespace,
    DestinationWorkload,
    DestinationPort,
}

impl Attr {
    fn named(name: &str) -> Option<Attr> {
        Some(match name {
            "response.code" => Attr::ResponseCode,
            "request.method" => Attr::RequestMethod,
            "request.path" | "request.url_path" => Attr::RequestPath,
            "request.host" => Attr::RequestHost,
            "request.protocol" => Attr::RequestProtocol,
            "source.principal" => Attr::SourcePrincipal,
            "source.namespace" => Attr::SourceNamespace,
            "source.workload.name" => Attr::SourceWorkload,
            "destination.service.name" => Attr::DestinationServiceName,
            "destination.service.host" => Attr::DestinationServiceHost,
            "destination.service.namespace" => Attr::DestinationServiceNamespace,
            "destination.workload.name" => Attr::DestinationWorkload,
            "destination.port" => Attr::DestinationPort,
            _ => return None,
        })
    }
}

/// A value an attribute has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i64),
    Str(Cow<'a, str>),
}

impl Value<'_> {
    /// The value as a metric label or log field shows it.
    pub fn to_text(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::Str(s) => s.to_string(),
        }
    }
}

/// A literal or an attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    Attr(Attr),
    Str(String),
    Int(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A boolean expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Cmp(Operand, Cmp, Operand),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

/// Why an expression cannot be read, with the byte offset where it went wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExprError {
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("at {at}: {what}")]
    Syntax { at: usize, what: String },
    #[error("unknown attribute {0:?}")]
    UnknownAttribute(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Int(i64),
    Op(&'static str),
    Open,
    Close,
}

fn tokens(text: &str) -> Result<Vec<(usize, Token)>, ExprError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let syntax = |at: usize, what: &str| ExprError::Syntax {
        at,
        what: what.to_owned(),
    };
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let two = text.get(i..i + 2).unwrap_or("");
        if let Some(op) = ["==", "!=", ">=", "<=", "&&", "||"].into_iter().find(|o| *o == two) {
            out.push((start, Token::Op(op)));
            i += 2;
            continue;
        }
        match c {
            b'>' => out.push((start, Token::Op(">"))),
            b'<' => out.push((start, Token::Op("<"))),
            b'!' => out.push((start, Token::Op("!"))),
            b'(' => out.push((start, Token::Open)),
            b')' => out.push((start, Token::Close)),
            b'\'' | b'"' => {
                let end = text[i + 1..]
                    .find(c as char)
                    .ok_or_else(|| syntax(start, "unterminated string"))?;
                out.push((start, Token::Str(text[i + 1..i + 1 + end].to_owned())));
                i += end + 2;
                continue;
            }
            b'0'..=b'9' | b'-' => {
                let len = text[i + 1..]
                    .find(|ch: char| !ch.is_ascii_digit())
                    .unwrap_or(text.len() - i - 1);
                let n = text[i..=i + len].parse().map_err(|_| syntax(start, "not a number"))?;
                out.push((start, Token::Int(n)));
                i += len + 1;
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                // An attribute path, with an optional ['key'] index.
                let mut end = i;
                while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_' || b[end] == b'.') {
                    end += 1;
                }
                if text[end..].starts_with("['") || text[end..].starts_with("[\"") {
                    let quote = b[end + 1] as char;
                    let close = text[end + 2..]
                        .find(quote)
                        .ok_or_else(|| syntax(end, "unterminated index"))?;
                    let after = end + 2 + close + 1;
                    if b.get(after) != Some(&b']') {
                        return Err(syntax(after, "expected ]"));
                    }
                    end = after + 1;
                }
                out.push((start, Token::Ident(text[start..end].to_owned())));
                i = end;
                continue;
            }
            _ => return Err(syntax(start, "unexpected character")),
        }
        i += 1;
    }
    Ok(out)
}

fn attribute(name: &str) -> Result<Attr, ExprError> {
    if let Some(rest) = name.strip_prefix("request.headers[") {
        let key = rest.trim_end_matches(']').trim_matches(|c| c == '\'' || c == '"');
        return Ok(Attr::RequestHeader(key.to_ascii_lowercase()));
    }
    Attr::named(name).ok_or_else(|| ExprError::UnknownAttribute(name.to_owned()))
}

struct Parser {
    toks: Vec<(usize, Token)>,
    pos: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.len, |(a, _)| *a)
    }

    fn fail<T>(&self, what: &str) -> Result<T, ExprError> {
        Err(ExprError::Syntax {
            at: self.at(),
            what: what.to_owned(),
        })
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let mut left = self.and(depth)?;
        while self.peek() == Some(&Token::Op("||")) {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and(depth)?));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let mut left = self.unary(depth)?;
        while self.peek() == Some(&Token::Op("&&")) {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary(depth)?));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ExprError> {
        if depth >= MAX_DEPTH {
            return Err(ExprError::TooDeep);
        }
        match self.peek() {
            Some(Token::Op("!")) => {
                self.pos += 1;
                Ok(Expr::Not(Box::new(self.unary(depth + 1)?)))
            }
            Some(Token::Open) => {
                self.pos += 1;
                let e = self.or(depth + 1)?;
                if self.peek() != Some(&Token::Close) {
                    return self.fail("expected )");
                }
                self.pos += 1;
                Ok(e)
            }
            _ => self.comparison(),
        }
    }

    fn operand(&mut self) -> Result<Operand, ExprError> {
        let t = self.peek().cloned();
        self.pos += 1;
        match t {
            Some(Token::Ident(name)) => Ok(Operand::Attr(attribute(&name)?)),
            Some(Token::Str(s)) => Ok(Operand::Str(s)),
            Some(Token::Int(i)) => Ok(Operand::Int(i)),
            _ => {
                self.pos -= 1;
                self.fail("expected an attribute or a literal")
            }
        }
    }

    fn comparison(&mut self) -> Result<Expr, ExprError> {
        let left = self.operand()?;
        let cmp = match self.peek() {
            Some(Token::Op("==")) => Cmp::Eq,
            Some(Token::Op("!=")) => Cmp::Ne,
            Some(Token::Op("<")) => Cmp::Lt,
            Some(Token::Op("<=")) => Cmp::Le,
            Some(Token::Op(">")) => Cmp::Gt,
            Some(Token::Op(">=")) => Cmp::Ge,
            _ => return self.fail("expected a comparison (==, !=, <, <=, >, >=)"),
        };
        self.pos += 1;
        Ok(Expr::Cmp(left, cmp, self.operand()?))
    }
}

/// Parses a boolean expression (an access-log filter).
pub fn parse_filter(text: &str) -> Result<Expr, ExprError> {
    if text.len() > MAX_LEN {
        return Err(ExprError::TooLong);
    }
    let mut p = Parser {
        toks: tokens(text)?,
        pos: 0,
        len: text.len(),
    };
    let e = p.or(0)?;
    if p.pos != p.toks.len() {
        return p.fail("unexpected text after the expression");
    }
    Ok(e)
}

/// Parses a value expression (a metric tag's UPSERT value): a literal or an attribute.
pub fn parse_value(text: &str) -> Result<Operand, ExprError> {
    if text.len() > MAX_LEN {
        return Err(ExprError::TooLong);
    }
    let mut p = Parser {
        toks: tokens(text)?,
        pos: 0,
        len: text.len(),
    };
    let v = p.operand()?;
    if p.pos != p.toks.len() {
        return p.fail("a tag value is one attribute or literal");
    }
    Ok(v)
}

impl Operand {
    /// The operand's value; `None` for an attribute the request does not have.
    pub fn value<'s, 'v: 's>(&'s self, attrs: &impl Fn(&Attr) -> Option<Value<'v>>) -> Option<Value<'s>> {
        match self {
            Operand::Attr(a) => attrs(a),
            Operand::Str(s) => Some(Value::Str(Cow::Borrowed(s))),
            Operand::Int(i) => Some(Value::Int(*i)),
        }
    }
}

impl Expr {
    /// Evaluates against a request's attributes; a comparison with a missing attribute is false.
    pub fn eval<'v>(&self, attrs: &impl Fn(&Attr) -> Option<Value<'v>>) -> bool {
        match self {
            Expr::And(a, b) => a.eval(attrs) && b.eval(attrs),
            Expr::Or(a, b) => a.eval(attrs) || b.eval(attrs),
            Expr::Not(e) => !e.eval(attrs),
            Expr::Cmp(l, cmp, r) => {
                let (Some(l), Some(r)) = (l.value(attrs), r.value(attrs)) else {
                    return false;
                };
                let ord = match (&l, &r) {
                    (Value::Int(a), Value::Int(b)) => a.cmp(b),
                    (Value::Str(a), Value::Str(b)) => a.cmp(b),
                    // Mixed: compare as text (a header holding a number, say).
                    _ => l.to_text().cmp(&r.to_text()),
                };
                match cmp {
                    Cmp::Eq => ord.is_eq(),
                    Cmp::Ne => ord.is_ne(),
                    Cmp::Lt => ord.is_lt(),
                    Cmp::Le => ord.is_le(),
                    Cmp::Gt => ord.is_gt(),
                    Cmp::Ge => ord.is_ge(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(a: &Attr) -> Option<Value<'static>> {
        match a {
            Attr::ResponseCode => Some(Value::Int(503)),
            Attr::RequestMethod => Some(Value::Str("POST".into())),
            Attr::RequestHeader(h) if h == "x-user" => Some(Value::Str("alice".into())),
            _ => None,
        }
    }

    #[test]
    fn filters_parse_and_decide() {
        let table = [
            ("response.code >= 500", true),
            ("response.code >= 500 && request.method == 'GET'", false),
            ("response.code < 400 || request.method == \"POST\"", true),
            ("!(response.code == 503)", false),
            ("request.headers['x-user'] == 'alice'", true),
            ("request.headers['X-User'] != 'bob'", true),
            ("request.host == 'x'", false), // missing attribute: false
            ("(response.code > 499) && (response.code < 600)", true),
        ];
        for (text, want) in table {
            let e = parse_filter(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(e.eval(&attrs), want, "{text}");
        }
    }

    #[test]
    fn bad_expressions_name_what_and_where() {
        assert_eq!(
            parse_filter("response.code >= "),
            Err(ExprError::Syntax {
                at: 17,
                what: "expected an attribute or a literal".into()
            })
        );
        assert_eq!(
            parse_filter("response.size > 1"),
            Err(ExprError::UnknownAttribute("response.size".into()))
        );
        assert!(matches!(parse_filter("response.code"), Err(ExprError::Syntax { .. })));
        assert!(matches!(parse_filter("'a' == 'b"), Err(ExprError::Syntax { .. })));
        assert!(matches!(parse_filter("a == b c"), Err(ExprError::UnknownAttribute(_))));
        assert_eq!(parse_filter(&"(".repeat(40)), Err(ExprError::TooDeep));
        assert_eq!(parse_filter(&"a".repeat(MAX_LEN + 1)), Err(ExprError::TooLong));
        assert_eq!(parse_value("request.host"), Ok(Operand::Attr(Attr::RequestHost)));
        assert_eq!(parse_value("'prod'"), Ok(Operand::Str("prod".into())));
        assert!(parse_value("request.host == 'x'").is_err());
    }
}
