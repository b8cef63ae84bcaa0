//! Test clients built on rumqttc (an independent MQTT implementation): each
//! client's event loop runs in a tokio task that forwards every incoming
//! packet, and the error that ends the connection, to a channel. Every wait
//! is bounded.
#![allow(dead_code, unused_imports)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_channel::{Receiver, TryRecvError};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest wait for something that must happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// Wait used to check that nothing (more) arrives, after a positive sync point.
pub const QUIET: Duration = Duration::from_millis(400);
/// How often a waiting test looks at a client's channel.
const POLL: Duration = Duration::from_millis(2);

/// What a client's event loop reports.
#[derive(Debug)]
pub enum Ev<P, E> {
    /// An incoming packet.
    Packet(P),
    /// The connection ended with this error; the task stops (no reconnect).
    Closed(E),
}

/// The receiving side of a client: a channel of events and a stash of events
/// that were skipped while waiting for something else.
pub struct Events<P, E> {
    rx: Receiver<Ev<P, E>>,
    stash: VecDeque<Box<Ev<P, E>>>,
    task: JoinHandle<()>,
}

impl<P: Debug, E: Debug> Events<P, E> {
    /// The first event (stashed or new, within `wait`) that `f` accepts;
    /// events `f` gives back are stashed in order.
    pub async fn find<T>(
        &mut self,
        wait: Duration,
        mut f: impl FnMut(Box<Ev<P, E>>) -> Result<T, Box<Ev<P, E>>>,
    ) -> Option<T> {
        let mut i = 0;
        while i < self.stash.len() {
            let ev = self.stash.remove(i).expect("index in range");
            match f(ev) {
                Ok(t) => return Some(t),
                Err(ev) => {
                    self.stash.insert(i, ev);
                    i += 1;
                }
            }
        }
        // tokio's channels are not among the enabled features: poll a
        // crossbeam channel with short sleeps, up to the deadline.
        let deadline = Instant::now() + wait;
        loop {
            match self.rx.try_recv() {
                Ok(ev) => match f(Box::new(ev)) {
                    Ok(t) => return Some(t),
                    Err(ev) => self.stash.push_back(ev),
                },
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// What `pick` takes from the first packet (within `wait`) it picks;
    /// packets it passes over are stashed. Panics if the connection ends
    /// while `doing`.
    pub async fn packet<T>(
        &mut self,
        wait: Duration,
        doing: &str,
        mut pick: impl FnMut(&P) -> Option<T>,
    ) -> Option<T> {
        self.find(wait, |ev| {
            let picked = match &*ev {
                Ev::Packet(p) => pick(p),
                Ev::Closed(e) => panic!("connection closed while {doing}: {e:?}"),
            };
            picked.ok_or(ev)
        })
        .await
    }

    /// Like `packet` within WAIT, but panics unless `what` arrives.
    pub async fn expect_packet<T>(
        &mut self,
        what: &str,
        doing: &str,
        pick: impl FnMut(&P) -> Option<T>,
    ) -> T {
        match self.packet(WAIT, doing, pick).await {
            Some(t) => t,
            None => panic!("{what} within the wait"),
        }
    }

    /// Wait for the packet `is` picks out (an acknowledgement); panics unless
    /// `what` arrives within WAIT.
    pub async fn expect_ack(&mut self, what: &str, doing: &str, is: impl Fn(&P) -> bool) {
        self.expect_packet(what, doing, |p| is(p).then_some(()))
            .await
    }

    /// Wait until the connection ends; returns the error that ended it.
    pub async fn closed(&mut self) -> E {
        self.find(WAIT, |ev| match *ev {
            Ev::Closed(e) => Ok(e),
            other => Err(Box::new(other)),
        })
        .await
        .expect("the connection closes within the wait")
    }

    /// Everything stashed so far, for failure messages.
    pub fn stashed(&self) -> String {
        format!("{:?}", self.stash)
    }

    /// Drop the event loop (and so the socket) without sending DISCONNECT.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl<P, E> Drop for Events<P, E> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the scenarios written once for both protocol versions
/// (`scenarios.rs`) need from a client; `v3::Client` and `v5::Client`
/// implement it by calling their own methods of the same names.
pub trait Session: Sized {
    /// A SUBACK return code of this version.
    type SubAckCode: PartialEq + Debug;
    /// The code that grants QoS 1.
    const GRANTED_QOS1: Self::SubAckCode;

    /// Connect as `id` with the version's default options.
    async fn connect_as(addr: SocketAddr, id: &str) -> Self;
    /// Subscribe at QoS 1 and wait for the SUBACK.
    async fn subscribe_qos1(&mut self, filter: &str) -> Vec<Self::SubAckCode>;
    /// Publish at QoS 1 (not retained) and wait for the PUBACK.
    async fn publish_acked(&mut self, topic: &str, payload: &[u8]);
    /// The payload of the next PUBLISH within `wait`, if any.
    async fn try_next_text(&mut self, wait: Duration) -> Option<String>;
    /// The payload of the next PUBLISH; panics if none arrives within WAIT.
    async fn next_text(&mut self) -> String;
    /// Assert no PUBLISH arrives within QUIET.
    async fn expect_no_publish(&mut self);
    /// Send DISCONNECT and wait for the broker to close the connection.
    async fn disconnect(self);
}

/// What `v3` and `v5` have in common. rumqttc's 3.1.1 and 5.0 APIs have the
/// same shape but separate types, so this is expanded once in each module,
/// where `AsyncClient`, `Event`, `Packet`, `Publish`, `QoS`, ... name that
/// version's types.
macro_rules! client_common {
    () => {
        /// A connected client.
        pub struct Client {
            pub client: AsyncClient,
            pub events: Events<Packet, ConnectionError>,
            pub connack: ConnAck,
        }

        /// Connect and wait for CONNACK (panics if refused or none arrives).
        pub async fn connect(options: MqttOptions) -> Client {
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            let (tx, rx) = crossbeam_channel::unbounded();
            let task = tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(p)) => {
                            if tx.send(Ev::Packet(p)).is_err() {
                                return;
                            }
                        }
                        Ok(Event::Outgoing(_)) => {}
                        Err(e) => {
                            let _ = tx.send(Ev::Closed(e));
                            return;
                        }
                    }
                }
            });
            let mut events = Events {
                rx,
                stash: VecDeque::new(),
                task,
            };
            let connack = events
                .find(WAIT, |ev| match *ev {
                    Ev::Packet(Packet::ConnAck(a)) => Ok(Ok(a)),
                    Ev::Closed(e) => Ok(Err(e)),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("CONNACK within the wait")
                .unwrap_or_else(|e| panic!("connect failed: {e:?}"));
            Client {
                client,
                events,
                connack,
            }
        }

        impl Client {
            /// Wait for the SUBACK of a subscribe just sent.
            async fn suback(&mut self) -> Vec<SubscribeReasonCode> {
                self.events
                    .expect_packet("SUBACK", "subscribing", |p| match p {
                        Packet::SubAck(a) => Some(a.return_codes.clone()),
                        _ => None,
                    })
                    .await
            }

            /// Unsubscribe and wait for the UNSUBACK.
            pub async fn unsubscribe(&mut self, filter: &str) {
                self.client
                    .unsubscribe(filter)
                    .await
                    .expect("request queued");
                let is_unsuback = |p: &Packet| matches!(p, Packet::UnsubAck(_));
                self.events
                    .expect_ack("UNSUBACK", "unsubscribing", is_unsuback)
                    .await
            }

            /// Publish without waiting for any acknowledgement.
            pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
                self.client
                    .publish(topic, qos, retain, payload.to_vec())
                    .await
                    .expect("request queued");
            }

            /// Wait for the next PUBACK from the broker.
            pub async fn puback(&mut self) {
                let is_puback = |p: &Packet| matches!(p, Packet::PubAck(_));
                self.events
                    .expect_ack("PUBACK", "publishing", is_puback)
                    .await
            }

            /// True when a PUBACK comes within `wait`.
            #[allow(dead_code)]
            pub async fn puback_within(&mut self, wait: Duration) -> bool {
                let is_puback = |p: &Packet| matches!(p, Packet::PubAck(_)).then_some(());
                (self.events.packet(wait, "publishing", is_puback).await).is_some()
            }

            /// Publish at QoS 1 and wait for the broker's PUBACK.
            pub async fn publish_acked(&mut self, topic: &str, retain: bool, payload: &[u8]) {
                self.publish(topic, QoS::AtLeastOnce, retain, payload).await;
                self.puback().await;
            }

            /// Next PUBLISH within `wait`, if any (panics if the connection ends).
            pub async fn try_next_publish(&mut self, wait: Duration) -> Option<Publish> {
                self.events
                    .packet(wait, "waiting for PUBLISH", |p| match p {
                        Packet::Publish(p) => Some(p.clone()),
                        _ => None,
                    })
                    .await
            }

            /// Next PUBLISH; panics if none arrives within `wait`.
            pub async fn next_publish_within(&mut self, wait: Duration) -> Publish {
                match self.try_next_publish(wait).await {
                    Some(p) => p,
                    None => panic!(
                        "no PUBLISH within {wait:?}; other events: {}",
                        self.events.stashed()
                    ),
                }
            }

            /// Next PUBLISH; panics if none arrives within WAIT.
            pub async fn next_publish(&mut self) -> Publish {
                self.next_publish_within(WAIT).await
            }

            /// Assert no PUBLISH arrives within QUIET.
            pub async fn expect_no_publish(&mut self) {
                if let Some(p) = self.try_next_publish(QUIET).await {
                    panic!("expected no PUBLISH, got {p:?}");
                }
            }

            /// Wait until the connection ends; returns the error that ended it.
            pub async fn closed(&mut self) -> ConnectionError {
                self.events.closed().await
            }

            /// Send DISCONNECT (normal) and wait for the broker to close.
            pub async fn disconnect(mut self) {
                self.client.disconnect().await.expect("request queued");
                self.closed().await;
            }
        }

        impl Session for Client {
            type SubAckCode = SubscribeReasonCode;
            const GRANTED_QOS1: SubscribeReasonCode =
                SubscribeReasonCode::Success(QoS::AtLeastOnce);

            async fn connect_as(addr: SocketAddr, id: &str) -> Client {
                connect(options(addr, id)).await
            }

            async fn subscribe_qos1(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
                self.subscribe(filter, QoS::AtLeastOnce).await
            }

            async fn publish_acked(&mut self, topic: &str, payload: &[u8]) {
                Client::publish_acked(self, topic, false, payload).await
            }

            async fn try_next_text(&mut self, wait: Duration) -> Option<String> {
                self.try_next_publish(wait).await.map(|p| text(&p))
            }

            async fn next_text(&mut self) -> String {
                text(&self.next_publish().await)
            }

            async fn expect_no_publish(&mut self) {
                Client::expect_no_publish(self).await
            }

            async fn disconnect(self) {
                Client::disconnect(self).await
            }
        }

        /// Payload as text.
        pub fn text(p: &Publish) -> String {
            String::from_utf8_lossy(&p.payload).into_owned()
        }
    };
}

pub mod v3 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnAck, ConnectionError, Event, LastWill, MqttOptions, Packet, Publish, QoS,
        SubscribeReasonCode,
    };

    pub type Ev3 = Ev<Packet, ConnectionError>;

    /// Options for `id` at `addr`: clean session, keepalive 30 s.
    pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o
    }

    client_common!();

    impl Client {
        /// Subscribe and wait for the SUBACK; returns its return codes.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("request queued");
            self.suback().await
        }
    }
}

pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnAckProperties, ConnectProperties, DisconnectReasonCode, Filter, LastWill,
        LastWillProperties, Packet, Publish, PublishProperties, RetainForwardRule,
        SubscribeProperties, SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};

    /// Options for `id` at `addr`: clean start, keepalive 30 s, no session
    /// expiry.
    pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(true);
        o
    }

    /// A QoS 1 will on `topic`, with a Will Delay Interval if `delay`.
    pub fn will(topic: &str, payload: &[u8], retain: bool, delay: Option<u32>) -> LastWill {
        let props = LastWillProperties {
            delay_interval: delay,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        LastWill::new(
            topic,
            payload.to_vec(),
            QoS::AtLeastOnce,
            retain,
            Some(props),
        )
    }

    /// Set the Session Expiry Interval in CONNECT (keeps other properties).
    pub fn set_session_expiry(o: &mut MqttOptions, seconds: u32) {
        let mut props = o.connect_properties().unwrap_or_default();
        props.session_expiry_interval = Some(seconds);
        o.set_connect_properties(props);
    }

    /// A filter with every option spelled out.
    pub fn filter(
        path: &str,
        qos: QoS,
        no_local: bool,
        retain_as_published: bool,
        retain_handling: RetainForwardRule,
    ) -> Filter {
        Filter {
            path: path.to_string(),
            qos,
            nolocal: no_local,
            preserve_retain: retain_as_published,
            retain_forward_rule: retain_handling,
        }
    }

    client_common!();

    impl Client {
        /// CONNACK properties (panics if the broker sent none).
        pub fn connack_props(&self) -> &ConnAckProperties {
            self.connack
                .properties
                .as_ref()
                .expect("a 5.0 CONNACK with properties")
        }

        /// Subscribe with options and an optional subscription identifier;
        /// wait for the SUBACK and return its reason codes.
        pub async fn subscribe_filters(
            &mut self,
            filters: Vec<Filter>,
            subscription_id: Option<usize>,
        ) -> Vec<SubscribeReasonCode> {
            let props = SubscribeProperties {
                id: subscription_id,
                user_properties: Vec::new(),
            };
            self.client
                .subscribe_many_with_properties(filters, props)
                .await
                .expect("request queued");
            self.suback().await
        }

        /// Plain subscribe; wait for the SUBACK.
        pub async fn subscribe(&mut self, path: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.subscribe_filters(vec![Filter::new(path, qos)], None)
                .await
        }

        /// Publish with properties, without waiting.
        pub async fn publish_props(
            &self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: &[u8],
            props: PublishProperties,
        ) {
            self.client
                .publish_with_properties(topic, qos, retain, payload.to_vec(), props)
                .await
                .expect("request queued");
        }

        /// Publish at QoS 1 with properties and wait for the PUBACK.
        pub async fn publish_props_acked(
            &mut self,
            topic: &str,
            payload: &[u8],
            props: PublishProperties,
        ) {
            self.publish_props(topic, QoS::AtLeastOnce, false, payload, props)
                .await;
            self.puback().await;
        }
    }

    /// Topic as text (rumqttc resolves incoming topic aliases).
    pub fn topic(p: &Publish) -> String {
        String::from_utf8_lossy(&p.topic).into_owned()
    }

    /// The properties of a received PUBLISH, or the default when it had none.
    pub fn props(p: &Publish) -> PublishProperties {
        p.properties.clone().unwrap_or_default()
    }
}
