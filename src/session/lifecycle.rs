//! Connect, disconnect, takeover, will and expiry: the session's life.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{self, reason, BoxedProperties, ConnAck, Connect, Packet, Properties, Will};
use crate::message::Message;
use crate::text::quote;

use super::{Action, Conn, Presence, Session};

/// What the shard learns when a connection is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Generation of the new connection (tags its socket tasks).
    pub generation: u64,
}

impl Session {
    /// Attach a connection from a validated CONNECT and queue the CONNACK
    /// (then any redelivery). The shard has already decided whether the
    /// session is resumed (`session_present`), taken over a live connection
    /// with [`Session::takeover`], and assigned a client id when the client
    /// sent an empty one.
    pub fn connect(
        &mut self,
        now: Instant,
        connect: Connect,
        session_present: bool,
        assigned_client_id: Option<&str>,
    ) -> Attached {
        debug_assert!(
            self.conn().is_none(),
            "takeover must detach the old connection first"
        );
        let requested_expiry = self.requested_expiry(&connect);
        self.expiry_s = requested_expiry.min(self.limits.session_expiry_s_max);
        let (keep_alive, server_keep_alive) = self.grant_keep_alive(&connect);
        let props = &connect.properties;
        let client_receive_max = props.receive_maximum.unwrap_or(u16::MAX);
        let conn = Conn {
            version: connect.version,
            keep_alive: Duration::from_secs(u64::from(keep_alive)),
            last_activity: now,
            window: client_receive_max.min(self.limits.inflight_max).max(1),
            // No client asks for more than MQTT can encode: the size checks
            // before encoding then also keep the encoder within its limits.
            max_packet_out: props
                .maximum_packet_size
                .unwrap_or(u32::MAX)
                .min(codec::MAX_PACKET_SIZE as u32),
            alias_out_max: props.topic_alias_maximum.unwrap_or(0),
            aliases: None,
            will: connect.will.map(|mut w| {
                crate::message::own_buffers(&mut w.payload, Some(&mut w.properties));
                Box::new(w)
            }),
            expiry_was_zero: requested_expiry == 0,
            deadline: None,
        };
        let response_info = props.request_response_information == Some(1);
        // [MQTT-3.1.3-9]: a reconnect before the will delay cancels the
        // will (it is dropped with the offline state).
        self.presence = Presence::Connected(conn);
        self.generation += 1;
        let mut ack = ConnAck {
            session_present,
            reason: reason::SUCCESS,
            properties: BoxedProperties::default(),
        };
        if connect.version.is_v5() {
            ack.properties = self
                .connack_properties(
                    requested_expiry,
                    server_keep_alive,
                    assigned_client_id,
                    response_info,
                )
                .into();
        }
        self.push_packet(Packet::ConnAck(ack));
        self.redeliver(now);
        Attached {
            generation: self.generation,
        }
    }

    /// Session Expiry Interval the client asked for: 5.0 from the property,
    /// 3.x from the clean session flag (clean = ends with the connection,
    /// persistent = never expires, subject to the configured maximum).
    fn requested_expiry(&self, connect: &Connect) -> u32 {
        if connect.version.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        }
    }

    /// Keepalive in force and, for 5.0, the Server Keep Alive to announce
    /// when it differs from what the client asked.
    fn grant_keep_alive(&self, connect: &Connect) -> (u16, Option<u16>) {
        let max = self.limits.keep_alive_s_max;
        let asked = connect.keep_alive;
        if connect.version.is_v5() && max > 0 && (asked == 0 || asked > max) {
            (max, Some(max))
        } else {
            (asked, None)
        }
    }

    fn connack_properties(
        &self,
        requested_expiry: u32,
        server_keep_alive: Option<u16>,
        assigned_client_id: Option<&str>,
        response_info: bool,
    ) -> Properties {
        let l = &self.limits;
        Properties {
            session_expiry_interval: (self.expiry_s != requested_expiry).then_some(self.expiry_s),
            receive_maximum: Some(l.receive_maximum),
            maximum_packet_size: Some(l.packet_size_max_bytes),
            topic_alias_maximum: (l.topic_alias_max > 0).then_some(l.topic_alias_max),
            assigned_client_identifier: assigned_client_id.map(str::to_string),
            server_keep_alive,
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            subscription_identifier_available: Some(1),
            shared_subscription_available: Some(1),
            response_information: response_info
                .then(|| format!("{}/{}", l.response_topic_prefix, self.client_id)),
            ..Properties::default()
        }
    }

    /// The network connection ended without DISCONNECT (read error, EOF).
    /// `generation` guards against a late report from a replaced connection.
    pub fn connection_lost(&mut self, now: Instant, generation: u64) {
        if self.conn().is_some() && generation == self.generation {
            client_log!(self, now, log::Level::Debug, "connection lost");
            self.detach(now, true);
        }
    }

    /// A new connection with this client id arrived: DISCONNECT 0x8E to the
    /// old one (5.0), close it, and handle its will as for any abnormal end.
    pub fn takeover(&mut self, now: Instant) {
        if self.conn().is_some() {
            client_log!(self, now, log::Level::Info, "session taken over");
            self.send_disconnect(reason::SESSION_TAKEN_OVER, None);
            self.detach(now, true);
        }
    }

    /// An operator asked (the admin API): DISCONNECT 0x98 (5.0) and close
    /// the connection, its will handled as for any abnormal end; with
    /// `discard`, the session ends too (its queue and subscriptions go).
    /// False when there was neither a connection to close nor a session
    /// to discard.
    pub fn kick(&mut self, now: Instant, discard: bool) -> bool {
        let connected = self.conn().is_some();
        if connected {
            client_log!(self, now, log::Level::Info, "disconnected by an operator");
            self.send_disconnect(reason::ADMINISTRATIVE_ACTION, None);
            self.detach(now, true);
        }
        if discard && !self.ended {
            self.end(now);
            return true;
        }
        connected
    }

    /// Drop the will waiting for its delay, if any (its client came back
    /// where this session cannot see it); true if there was one.
    pub fn cancel_pending_will(&mut self) -> bool {
        self.take_pending_will().is_some()
    }

    /// The broker is stopping: DISCONNECT 0x8B (5.0) and close. The server
    /// ends the connection without the client's DISCONNECT, so the will is
    /// handled as for any abnormal end ([MQTT-3.1.2-8]): published now, or
    /// kept pending for its delay.
    pub fn shutdown(&mut self, now: Instant) {
        if self.conn().is_some() {
            self.send_disconnect(reason::SERVER_SHUTTING_DOWN, None);
            self.detach(now, true);
        }
    }

    /// A CONNECT with Clean Start discards this (offline) session: a pending
    /// will is published now, since the session ends ([MQTT-3.1.2-4]).
    pub fn discard(&mut self, now: Instant) {
        debug_assert!(self.conn().is_none());
        self.end(now);
    }

    /// Drop the connection part. The DISCONNECT (if any) stays queued in
    /// `transmit` for the shard to write to the old socket before closing.
    pub(super) fn detach(&mut self, now: Instant, publish_will: bool) {
        if self.conn().is_none() {
            return;
        }
        let offline = Presence::Offline {
            since: now,
            pending_will: None,
        };
        let Presence::Connected(conn) = std::mem::replace(&mut self.presence, offline) else {
            unreachable!("checked connected above")
        };
        // A will that goes now is published before the Close: its Accepted
        // record (which says the session's will is gone) then precedes
        // the Offline record (which says no will waits), so a power cut
        // between the two leaves a session that recovery takes as still
        // connected, and whose will it publishes.
        if let Some(will) = conn.will.filter(|_| publish_will) {
            self.schedule_will(now, *will);
        }
        self.actions.push_back(Action::Close);
        if self.expiry_s == 0 {
            self.end(now);
        }
    }

    /// Publish now, or after the Will Delay Interval (capped by the session
    /// expiry: the will goes at the earlier of the two).
    fn schedule_will(&mut self, now: Instant, will: Will) {
        let delay = will_delay_s(&will, self.expiry_s);
        if delay == 0 {
            self.publish_will(now, will);
        } else {
            let at = now + Duration::from_secs(u64::from(delay));
            if let Presence::Offline { pending_will, .. } = &mut self.presence {
                *pending_will = Some(Box::new((will, at)));
            }
        }
    }

    fn publish_will(&mut self, now: Instant, will: Will) {
        // A will is published as its client: the ACL must let it write
        // the topic (as Mosquitto checks it when the will goes out).
        if !self.may_write(now, &will.topic, "will") {
            return;
        }
        client_log!(
            self,
            now,
            log::Level::Debug,
            "publishing will on {}",
            quote(&will.topic)
        );
        self.actions.push_back(Action::Publish {
            message: Arc::new(Message::from_will(will, now)),
            packet_id: None,
            delay_s: None,
            will: true,
        });
    }

    /// The session ends: a pending will goes out, the shard drops the rest.
    fn end(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if let Some(pending) = self.take_pending_will() {
            let (will, _) = *pending;
            self.publish_will(now, will);
        }
        self.ended = true;
        self.actions.push_back(Action::End);
    }

    /// When an offline session expires, if it does.
    pub(super) fn expiry_deadline(&self) -> Option<Instant> {
        let since = self.offline_since()?;
        expires_after_s(self.expiry_s).map(|s| since + Duration::from_secs(u64::from(s)))
    }

    /// The broker has not read the connection until `now` (its shard
    /// paused reading while a peer node fell behind): the silence so far
    /// does not count against the keep-alive.
    pub fn excuse_silence(&mut self, now: Instant) {
        if let Some(c) = self.conn_mut() {
            c.last_activity = c.last_activity.max(now);
        }
    }

    /// Run whatever is due at `now`: the login's end (DISCONNECT 0xA0),
    /// keepalive expiry (0x8D), a delayed will, session expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self
            .conn()
            .and_then(|c| c.deadline)
            .is_some_and(|at| at <= now)
        {
            let why = "its login token expired (exp)";
            self.violation(now, reason::MAXIMUM_CONNECT_TIME, why);
        }
        if let Some(c) = self.conn() {
            if !c.keep_alive.is_zero() && now >= c.last_activity + c.keep_alive * 3 / 2 {
                let why = format!(
                    "no packet for 1.5 x keepalive ({} s)",
                    c.keep_alive.as_secs()
                );
                self.violation(now, reason::KEEP_ALIVE_TIMEOUT, &why);
            }
        }
        if self.pending_will().is_some_and(|w| w.1 <= now) {
            let (will, _) = *self.take_pending_will().expect("checked");
            self.publish_will(now, will);
        }
        if self.expiry_deadline().is_some_and(|at| at <= now) {
            client_log!(self, now, log::Level::Debug, "session expired");
            self.end(now);
        }
    }
}

/// When a session's will goes out if nothing cancels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillDue {
    /// Connected: this many seconds after the connection ends.
    AfterEnd(u32),
    /// Offline: at this time.
    At(Instant),
}

impl Session {
    /// The will this session would leave behind now, and when it is due:
    /// the connection's (connected), or the pending one (offline).
    pub fn will_now(&self) -> Option<(&Will, WillDue)> {
        match &self.presence {
            Presence::Connected(c) => c
                .will
                .as_deref()
                .map(|w| (w, WillDue::AfterEnd(will_delay_s(w, self.expiry_s)))),
            Presence::Offline {
                pending_will: Some(p),
                ..
            } => Some((&p.0, WillDue::At(p.1))),
            Presence::Offline { .. } => None,
        }
    }
}

/// Seconds after the connection ends that a will goes out: its Will Delay
/// Interval, capped by the session's expiry (the earlier of the two).
pub fn will_delay_s(will: &Will, expiry_s: u32) -> u32 {
    will.properties
        .will_delay_interval
        .unwrap_or(0)
        .min(expiry_s)
}

/// Seconds after going offline that a session with expiry interval
/// `expiry_s` ends; None for `u32::MAX` (never).
pub fn expires_after_s(expiry_s: u32) -> Option<u32> {
    (expiry_s != u32::MAX).then_some(expiry_s)
}
