//! MQTT topic rules: validation of topic names and filters, shared
//! subscription parsing, and the reference matcher.
//!
//! Levels are separated by `/`; a string has `count('/') + 1` levels and
//! empty levels are valid (`"a//b"`, `"/a"`, `"a/"`). All functions are pure.

/// Longest topic name or filter in bytes ([MQTT-1.5.3], UTF-8 string limit).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// The first level that marks a shared subscription (MQTT 5.0 §4.8.2).
pub const SHARE_PREFIX: &str = "$share";

/// Why a topic name, topic filter or shared subscription is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The string is empty.
    #[error("[MQTT-4.7.3-1] topic must be at least one character long")]
    Empty,
    /// The string is longer than 65535 bytes.
    #[error("[MQTT-1.5.3] topic is longer than 65535 bytes")]
    TooLong,
    /// The string has more levels than the broker allows.
    #[error("topic has {levels} levels, more than the configured maximum of {max}")]
    TooManyLevels {
        /// Levels the string has.
        levels: usize,
        /// Levels allowed.
        max: usize,
    },
    /// A topic name contains `+` or `#`.
    #[error("[MQTT-3.3.2-2] topic name contains a wildcard")]
    WildcardInName,
    /// `+` or `#` does not occupy a whole level, or `#` is not the last level.
    #[error(
        "[MQTT-4.7.1-2] [MQTT-4.7.1-3] wildcard must occupy a whole level and '#' must be last"
    )]
    BadWildcard,
    /// The string contains U+0000.
    #[error("[MQTT-4.7.3-2] topic contains the null character U+0000")]
    NullChar,
    /// A `$share/...` filter without a valid share name and topic filter.
    #[error("[MQTT-4.8.2-1] [MQTT-4.8.2-2] shared subscription must be $share/{{name}}/{{filter}}, name without '/', '+', '#'")]
    BadSharedSubscription,
    /// A `$delayed/...` topic without a valid delay and topic.
    #[error("a delayed publish must be $delayed/{{seconds}}/{{topic}}, seconds at most {DELAY_MAX_S}, topic not starting with '$'")]
    BadDelayedPublish,
}

/// First level of a delayed publish: `$delayed/{seconds}/{topic}`.
pub const DELAYED_PREFIX: &str = "$delayed";

/// Longest delay of a delayed publish, seconds (about 49 days, as EMQX).
pub const DELAY_MAX_S: u32 = 4_294_967;

/// Splits a delayed publish topic `$delayed/{seconds}/{topic}` into
/// `Some((seconds, topic))`; `Ok(None)` when the topic is not one. The
/// topic itself must be a valid name (checked by the caller with the
/// broker's level limit) and not start with `$`.
pub fn parse_delayed(topic: &str) -> Result<Option<(u32, &str)>, TopicError> {
    let Some(rest) = topic.strip_prefix(DELAYED_PREFIX) else {
        return Ok(None);
    };
    let Some(rest) = rest.strip_prefix('/') else {
        return Ok(None);
    };
    let (secs, inner) = rest.split_once('/').ok_or(TopicError::BadDelayedPublish)?;
    let secs: u32 = secs
        .parse()
        .ok()
        .filter(|s| *s <= DELAY_MAX_S && secs.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(TopicError::BadDelayedPublish)?;
    if inner.is_empty() || inner.starts_with('$') {
        return Err(TopicError::BadDelayedPublish);
    }
    Ok(Some((secs, inner)))
}

/// Number of levels of a topic name or filter: `count('/') + 1`.
pub fn level_count(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// Checks shared by names and filters: empty, length, U+0000, level count.
fn validate_common(s: &str, max_levels: usize) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullChar);
    }
    let levels = level_count(s);
    if levels > max_levels {
        return Err(TopicError::TooManyLevels {
            levels,
            max: max_levels,
        });
    }
    Ok(())
}

/// Validates a topic name (PUBLISH, will topic, retained topic): non-empty,
/// at most 65535 bytes, no U+0000, no `+` or `#`, at most `max_levels` levels.
///
/// Checks run in that order: `Empty`, `TooLong`, `NullChar`,
/// `TooManyLevels`, `WildcardInName`.
pub fn validate_topic_name(name: &str, max_levels: usize) -> Result<(), TopicError> {
    validate_common(name, max_levels)?;
    if has_wildcard(name) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Validates a topic filter (SUBSCRIBE, UNSUBSCRIBE): non-empty, at most
/// 65535 bytes, no U+0000, at most `max_levels` levels, `+` and `#` alone in
/// their level and `#` only as the last level.
///
/// A `$share/...` filter is checked as an ordinary filter here; split it with
/// [`parse_shared`] first and validate the inner filter.
pub fn validate_topic_filter(filter: &str, max_levels: usize) -> Result<(), TopicError> {
    validate_common(filter, max_levels)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if is_last => {}
            _ if has_wildcard(level) => return Err(TopicError::BadWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// Splits a shared subscription `$share/{group}/{filter}` into
/// `Some((group, filter))`.
///
/// The group must be non-empty without `/`, `+`, `#` and U+0000, and the
/// filter must be a valid topic filter (its level count is not checked here:
/// validate the returned filter with [`validate_topic_filter`] for that).
/// A filter whose first level is exactly `$share` but is not of that form
/// (`$share`, `$share/g`, `$share//a`, `$share/g+/a`) is
/// `Err(BadSharedSubscription)`; errors of the inner filter (`BadWildcard`,
/// `NullChar`, ...) are returned as they are. Anything else (including
/// `$shared/a`) is not a shared subscription: `Ok(None)`.
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let (first, rest) = match filter.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (filter, None),
    };
    if first != SHARE_PREFIX {
        return Ok(None);
    }
    let (group, inner) = rest
        .and_then(|rest| rest.split_once('/'))
        .ok_or(TopicError::BadSharedSubscription)?;
    let bad_group = |b: u8| matches!(b, b'+' | b'#' | 0);
    if group.is_empty() || inner.is_empty() || group.bytes().any(bad_group) {
        return Err(TopicError::BadSharedSubscription);
    }
    if filter.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    validate_topic_filter(inner, usize::MAX)?;
    Ok(Some((group, inner)))
}

/// Reference matcher with MQTT 3.1.1 §4.7 / 5.0 §4.7 semantics.
///
/// `+` matches exactly one level (possibly empty), `#` matches the rest of
/// the topic including the parent level (`a/#` matches `a`), and a topic
/// starting with `$` is not matched by a filter whose first level is `+` or
/// `#` ([MQTT-4.7.2-1]). Inputs are assumed valid (see the validators).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    if topic.starts_with('$') {
        let first = filter.split('/').next();
        if first == Some("+") || first == Some("#") {
            return false;
        }
    }
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True if `filter` contains `+` or `#` anywhere.
pub fn has_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// Splits off the first level: `"a/b/c"` → `("a", Some("b/c"))`,
/// `"a"` → `("a", None)`, `"a/"` → `("a", Some(""))`.
#[inline]
pub(crate) fn split_level(s: &str) -> (&str, Option<&str>) {
    // A byte loop beats `find` (memchr set-up) on short levels.
    match s.bytes().position(|b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}
