//! Client → server packets on an established connection.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Want;
use crate::codec::{
    reason, Auth, BoxedProperties, Disconnect, Packet, Properties, PubResp, Publish, QoS, SubAck,
    SubOptions, Subscribe, UnsubAck, Unsubscribe,
};
use crate::message::{user_properties_bytes, Message};
use crate::router::topic::{
    parse_delayed, parse_shared, validate_topic_filter, validate_topic_name,
};
use crate::text::quote;

use super::transmit::{AckKind, Outgoing};
use super::{Action, Session, Subscription};

impl Session {
    /// Feed one packet read from the attached connection. Packets for a
    /// session without a connection are ignored (the shard closes such
    /// sockets).
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) {
        let Some(conn) = self.conn_mut() else {
            return;
        };
        conn.last_activity = now;
        match packet {
            Packet::Publish(p) => self.on_publish(now, p),
            Packet::PubAck(a) => self.on_puback(now, &a),
            Packet::PubRec(r) => self.on_pubrec(now, &r),
            Packet::PubRel(r) => self.on_pubrel(&r),
            Packet::PubComp(c) => self.on_pubcomp(now, &c),
            Packet::Subscribe(s) => self.on_subscribe(now, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => self.push_packet(Packet::PingResp),
            Packet::Disconnect(d) => self.on_disconnect(now, d),
            Packet::Auth(a) => self.on_auth(now, a),
            Packet::Connect(_) => self.violation(
                now,
                reason::PROTOCOL_ERROR,
                "[MQTT-3.1.0-2] second CONNECT on a connection",
            ),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => self
                .violation(
                    now,
                    reason::PROTOCOL_ERROR,
                    "a client sent a packet only a server may send",
                ),
        }
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
    }

    /// A protocol violation or a malformed packet: log it with the client id,
    /// send DISCONNECT with `reason` (5.0 only), close, publish the will.
    pub fn violation(&mut self, now: Instant, reason: u8, why: &str) {
        if self.conn().is_none() {
            return;
        }
        client_log!(
            self,
            now,
            log::Level::Info,
            "{why}; closing (reason 0x{reason:02X})"
        );
        self.send_disconnect(reason, Some(why));
        self.detach(now, true);
    }

    fn on_publish(&mut self, now: Instant, mut p: Publish) {
        if !p.properties.subscription_identifiers.is_empty() {
            let why = "[MQTT-3.3.4-6] a client PUBLISH carries a Subscription Identifier";
            return self.violation(now, reason::PROTOCOL_ERROR, why);
        }
        if let Err((code, why)) = self.resolve_topic(&mut p) {
            return self.violation(now, code, &why);
        }
        if let Some(rt) = &p.properties.response_topic {
            if let Err(e) = validate_topic_name(rt, self.limits.topic_levels_max) {
                let why = format!("[MQTT-3.3.2-14] response topic {}: {e}", quote(rt));
                return self.violation(now, reason::PROTOCOL_ERROR, &why);
            }
        }
        let user_bytes = user_properties_bytes(&p.properties);
        if user_bytes > self.limits.user_properties_bytes_max {
            self.counters().refused_user_properties += 1;
            let why = format!(
                "{user_bytes} bytes of user properties, more than \
                 mqtt.user_properties_bytes_max ({})",
                self.limits.user_properties_bytes_max
            );
            return self.refuse_publish(now, &p, reason::QUOTA_EXCEEDED, &why);
        }
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            let why = "payload is not UTF-8 but its Payload Format Indicator says it is";
            return self.refuse_publish(now, &p, reason::PAYLOAD_FORMAT_INVALID, why);
        }
        let delay_s = match self.take_delay(&mut p) {
            Ok(d) => d,
            Err(why) => return self.refuse_publish(now, &p, reason::TOPIC_NAME_INVALID, &why),
        };
        if !self.may_write(now, &p.topic, "PUBLISH") {
            return self.deny_publish(&p);
        }
        let duplicate = p.qos == QoS::ExactlyOnce && self.inbound_qos2.contains(&p.packet_id);
        if let Some((code, why)) = self.cannot_take(&p, delay_s).filter(|_| !duplicate) {
            return self.refuse_publish(now, &p, code, why);
        }
        match p.qos {
            QoS::AtMostOnce => self.accept_publish(now, p, None, delay_s),
            QoS::AtLeastOnce => {
                let id = p.packet_id;
                self.accept_publish(now, p, Some(id), delay_s);
            }
            QoS::ExactlyOnce => self.on_publish_qos2(now, p, delay_s),
        }
    }

    /// The shard's verdict on a QoS 1/2 publish handed over in
    /// [`Action::Publish`]: acknowledge it, or refuse it because the shard
    /// could not store it (its log is full): 5.0 gets 0x97, 3.x a close (its
    /// acknowledgements cannot refuse; the client sends it again later).
    pub fn publish_done(&mut self, now: Instant, qos: QoS, packet_id: u16, accepted: bool) {
        if accepted {
            return self.acknowledge(qos, packet_id, reason::SUCCESS);
        }
        if qos == QoS::ExactlyOnce {
            self.inbound_qos2.remove(&packet_id);
        }
        self.counters().refused_store_full += 1;
        let why = "the message log is full (no disk space): QoS 1/2 messages are refused";
        if self.version().is_some_and(|v| v.is_v5()) {
            client_log!(self, now, log::Level::Warn, "PUBLISH refused (0x97): {why}");
            self.acknowledge(qos, packet_id, reason::QUOTA_EXCEEDED);
        } else {
            self.violation(now, reason::QUOTA_EXCEEDED, why);
        }
    }

    /// A PUBLISH the broker will not take. QoS 1/2 get the reason code in
    /// their acknowledgement (5.0) or a close (3.x, whose acknowledgements
    /// cannot refuse: the client sends it again later); QoS 0 a DISCONNECT.
    fn refuse_publish(&mut self, now: Instant, p: &Publish, code: u8, why: &str) {
        let v5 = self.version().is_some_and(|v| v.is_v5());
        if p.qos == QoS::AtMostOnce || !v5 {
            return self.violation(now, code, why);
        }
        client_log!(
            self,
            now,
            log::Level::Info,
            "PUBLISH to {} refused (0x{code:02X}): {why}",
            quote(&p.topic)
        );
        self.acknowledge(p.qos, p.packet_id, code);
    }

    /// True when the client may publish to `topic` (a PUBLISH or its
    /// will: `what`); otherwise counted and logged. `$SYS` topics are the
    /// broker's: no client writes them, whatever the ACL says (as
    /// Mosquitto's `acl__check_dollar`).
    pub(super) fn may_write(&mut self, now: Instant, topic: &str, what: &str) -> bool {
        let allowed = !topic.starts_with("$SYS")
            && self
                .acl
                .as_ref()
                .is_none_or(|a| a.allows(topic, Want::Write));
        if !allowed {
            self.counters().denied_publish += 1;
            client_log!(
                self,
                now,
                log::Level::Info,
                "{what} to {} not authorized by the ACL: dropped",
                quote(topic)
            );
        }
        allowed
    }

    /// A PUBLISH the ACL does not let the client write: 5.0 QoS 1/2 get
    /// 0x87 in their acknowledgement; anything else is acknowledged as
    /// usual and dropped (the spec's choice for a client that cannot be
    /// told), so the client does not send it again and again.
    fn deny_publish(&mut self, p: &Publish) {
        let v5 = self.version().is_some_and(|v| v.is_v5());
        let code = match v5 {
            true => reason::NOT_AUTHORIZED,
            false => reason::SUCCESS,
        };
        self.acknowledge(p.qos, p.packet_id, code);
    }

    /// A reason the shard cannot take this publish now: its log is full
    /// (QoS 1/2), or it holds as many delayed publishes as it may.
    fn cannot_take(&self, p: &Publish, delay_s: Option<u32>) -> Option<(u8, &'static str)> {
        let status = &self.limits.status;
        if p.qos != QoS::AtMostOnce && status.store_full.get() {
            self.counters().refused_store_full += 1;
            return Some((
                reason::QUOTA_EXCEEDED,
                "the message log is full (no disk space): QoS 1/2 messages are refused",
            ));
        }
        if delay_s.is_some() && status.delayed_full.get() {
            self.counters().refused_delayed_full += 1;
            return Some((
                reason::QUOTA_EXCEEDED,
                "storage.delayed_messages_max or delayed_bytes_max is reached",
            ));
        }
        None
    }

    /// A `$delayed/{seconds}/{topic}` publish gets its final topic; the
    /// delay is returned.
    fn take_delay(&self, p: &mut Publish) -> Result<Option<u32>, String> {
        let (secs, inner) = match parse_delayed(&p.topic) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", quote(&p.topic))),
        };
        validate_topic_name(inner, self.limits.topic_levels_max)
            .map_err(|e| format!("{}: {e}", quote(&p.topic)))?;
        p.topic = Arc::from(inner);
        Ok(Some(secs))
    }

    /// Exactly once, receiver side: route at the first PUBLISH with an id,
    /// answer a duplicate with PUBREC only, forget the id at PUBREL.
    fn on_publish_qos2(&mut self, now: Instant, p: Publish, delay_s: Option<u32>) {
        let id = p.packet_id;
        if !self.inbound_qos2.contains(&id) {
            if self.inbound_qos2.len() >= usize::from(self.limits.receive_maximum) {
                let why = "more unacknowledged QoS 2 publishes than the server's Receive Maximum";
                return self.violation(now, reason::RECEIVE_MAXIMUM_EXCEEDED, why);
            }
            self.inbound_qos2.insert(id);
            return self.accept_publish(now, p, Some(id), delay_s);
        }
        // A duplicate: acknowledged again, not routed again.
        self.acknowledge(QoS::ExactlyOnce, id, reason::SUCCESS);
    }

    fn accept_publish(
        &mut self,
        now: Instant,
        p: Publish,
        packet_id: Option<u16>,
        delay_s: Option<u32>,
    ) {
        let q = p.qos as usize;
        let mut counters = self.counters();
        counters.received[q] += 1;
        counters.received_bytes[q] += p.payload.len() as u64;
        drop(counters);
        let message = Message::from_publish(p, now, Some(self.client_id.clone()));
        self.actions.push_back(Action::Publish {
            message: Arc::new(message),
            packet_id,
            delay_s,
            will: false,
        });
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for an inbound publish.
    fn acknowledge(&mut self, qos: QoS, packet_id: u16, code: u8) {
        let reason = self.reason_for_version(code);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self
                .transmit
                .push(Outgoing::Ack(AckKind::Ack, packet_id, reason)),
            QoS::ExactlyOnce => self
                .transmit
                .push(Outgoing::Ack(AckKind::Rec, packet_id, reason)),
        }
    }

    /// Apply the inbound topic alias and validate the topic name.
    fn resolve_topic(&mut self, p: &mut Publish) -> Result<(), (u8, String)> {
        let super::Presence::Connected(conn) = &mut self.presence else {
            unreachable!("a PUBLISH is handled while connected")
        };
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.limits.topic_alias_max {
                let why = format!(
                    "[MQTT-3.3.2-9] topic alias {alias} is outside 1..={}",
                    self.limits.topic_alias_max
                );
                return Err((reason::TOPIC_ALIAS_INVALID, why));
            }
            if p.topic.is_empty() {
                match conn.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        let why = format!("[MQTT-3.3.2-7] topic alias {alias} was never set");
                        return Err((reason::PROTOCOL_ERROR, why));
                    }
                }
            } else {
                let aliases = conn.aliases.get_or_insert_with(Box::default);
                aliases.inbound.insert(alias, p.topic.clone());
            }
        }
        validate_topic_name(&p.topic, self.limits.topic_levels_max)
            .map_err(|e| (reason::TOPIC_NAME_INVALID, e.to_string()))
    }

    fn on_pubrel(&mut self, rel: &PubResp) {
        let code = if self.inbound_qos2.remove(&rel.packet_id) {
            let packet_id = rel.packet_id;
            self.journal
                .push_back(super::Journal::Qos2Done { packet_id });
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        let reason = self.reason_for_version(code);
        self.transmit
            .push(Outgoing::Ack(AckKind::Comp, rel.packet_id, reason));
    }

    fn on_subscribe(&mut self, now: Instant, s: Subscribe) {
        let subscription_id = s.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(s.filters.len());
        for (filter, options) in s.filters {
            match self.subscribe_one(now, filter, options, subscription_id) {
                Ok(code) => reasons.push(code),
                Err(why) => return self.violation(now, reason::PROTOCOL_ERROR, why),
            }
        }
        self.push_packet(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reasons,
            properties: BoxedProperties::default(),
        }));
    }

    /// Subscriptions the broker's configuration gives the client at
    /// CONNECT (`[[auto_subscribe]]`): each as one filter of a SUBSCRIBE,
    /// without SUBACK; refusals are logged.
    pub fn auto_subscribe(&mut self, now: Instant, filters: Vec<(String, SubOptions)>) {
        for (filter, options) in filters {
            let code = self.subscribe_one(now, filter.clone(), options, None);
            if !matches!(code, Ok(c) if c < 0x80) {
                client_log!(
                    self,
                    now,
                    log::Level::Warn,
                    "auto_subscribe to {} refused ({code:?})",
                    quote(&filter)
                );
            }
        }
    }

    /// One filter of a SUBSCRIBE: the SUBACK code, or a violation.
    fn subscribe_one(
        &mut self,
        now: Instant,
        filter: String,
        options: SubOptions,
        subscription_id: Option<u32>,
    ) -> Result<u8, &'static str> {
        let v5 = self.version().is_some_and(|v| v.is_v5());
        let failure = |code: u8| if v5 { code } else { reason::UNSPECIFIED_ERROR };
        let levels = self.limits.topic_levels_max;
        let valid = match parse_shared(&filter) {
            Ok(Some((_, inner))) => {
                if options.no_local {
                    return Err("[MQTT-3.8.3-4] No Local set on a shared subscription");
                }
                validate_topic_filter(inner, levels).is_ok()
            }
            Ok(None) => validate_topic_filter(&filter, levels).is_ok(),
            Err(_) => false,
        };
        if !valid {
            client_log!(
                self,
                now,
                log::Level::Info,
                "invalid topic filter {}",
                quote(&filter)
            );
            return Ok(failure(reason::TOPIC_FILTER_INVALID));
        }
        let inner = match parse_shared(&filter) {
            Ok(Some((_, inner))) => inner,
            _ => &filter,
        };
        if self
            .acl
            .as_ref()
            .is_some_and(|a| !a.allows_subscribe(inner))
        {
            self.counters().denied_subscribe += 1;
            client_log!(
                self,
                now,
                log::Level::Info,
                "SUBSCRIBE to {} not authorized by the ACL",
                quote(&filter)
            );
            return Ok(failure(reason::NOT_AUTHORIZED));
        }
        let is_new = !self.subscriptions.contains_key(&filter);
        if is_new && self.subscriptions.len() >= self.limits.subscriptions_max {
            return Ok(failure(reason::QUOTA_EXCEEDED));
        }
        let subscription = Subscription {
            options,
            subscription_id,
        };
        self.subscriptions
            .insert(filter.clone(), subscription.clone());
        self.actions.push_back(Action::Subscribe {
            filter,
            subscription,
            is_new,
        });
        Ok(options.qos as u8)
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            if self.subscriptions.remove(&filter).is_some() {
                self.actions.push_back(Action::Unsubscribe { filter });
                reasons.push(reason::SUCCESS);
            } else {
                reasons.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        if !self.version().is_some_and(|v| v.is_v5()) {
            reasons.clear();
        }
        self.push_packet(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reasons,
            properties: BoxedProperties::default(),
        }));
    }

    fn on_disconnect(&mut self, now: Instant, d: Disconnect) {
        let conn = self.conn().expect("connected");
        if let Some(expiry) = d.properties.session_expiry_interval {
            if conn.expiry_was_zero && expiry != 0 {
                let why = "[MQTT-3.14.2-2] DISCONNECT sets a session expiry after CONNECT set 0";
                return self.violation(now, reason::PROTOCOL_ERROR, why);
            }
            self.expiry_s = expiry.min(self.limits.session_expiry_s_max);
        }
        // [MQTT-3.14.4-3]: only a normal disconnection (0x00) discards the
        // will; 0x04 asks for it and an error code is no normal end either.
        let publish_will = d.reason != reason::SUCCESS;
        self.detach(now, publish_will);
    }

    fn on_auth(&mut self, now: Instant, a: Auth) {
        if a.properties.authentication_method.is_some() {
            let why = "no authentication method is supported";
            self.violation(now, reason::BAD_AUTHENTICATION_METHOD, why);
        } else {
            let why = "[MQTT-4.12.0-7] AUTH without an authentication method in CONNECT";
            self.violation(now, reason::PROTOCOL_ERROR, why);
        }
    }

    /// Queue a DISCONNECT with `code` for a 5.0 connection (3.x has none).
    pub(super) fn send_disconnect(&mut self, code: u8, why: Option<&str>) {
        if !self.version().is_some_and(|v| v.is_v5()) {
            return;
        }
        let properties = Properties {
            reason_string: why.map(str::to_string),
            ..Properties::default()
        };
        self.push_packet(Packet::Disconnect(Disconnect {
            reason: code,
            properties: properties.into(),
        }));
    }
}
