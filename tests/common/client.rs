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

    /// A connected 3.1.1 client.
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
        /// Subscribe and wait for the SUBACK; returns its return codes.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("request queued");
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Packet(Packet::SubAck(a)) => Ok(a.return_codes),
                    Ev::Closed(e) => panic!("connection closed while subscribing: {e:?}"),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("SUBACK within the wait")
        }

        /// Unsubscribe and wait for the UNSUBACK.
        pub async fn unsubscribe(&mut self, filter: &str) {
            self.client
                .unsubscribe(filter)
                .await
                .expect("request queued");
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Packet(Packet::UnsubAck(_)) => Ok(()),
                    Ev::Closed(e) => panic!("connection closed while unsubscribing: {e:?}"),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("UNSUBACK within the wait")
        }

        /// Publish without waiting for any acknowledgement.
        pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .expect("request queued");
        }

        /// Publish at QoS 1 and wait for the broker's PUBACK.
        pub async fn publish_acked(&mut self, topic: &str, retain: bool, payload: &[u8]) {
            self.publish(topic, QoS::AtLeastOnce, retain, payload).await;
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Packet(Packet::PubAck(_)) => Ok(()),
                    Ev::Closed(e) => panic!("connection closed while publishing: {e:?}"),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("PUBACK within the wait")
        }

        /// Next PUBLISH within `wait`, if any (panics if the connection ends).
        pub async fn try_next_publish(&mut self, wait: Duration) -> Option<Publish> {
            self.events
                .find(wait, |ev| match *ev {
                    Ev::Packet(Packet::Publish(p)) => Ok(p),
                    Ev::Closed(e) => panic!("connection closed while waiting for PUBLISH: {e:?}"),
                    other => Err(Box::new(other)),
                })
                .await
        }

        /// Next PUBLISH; panics if none arrives within WAIT.
        pub async fn next_publish(&mut self) -> Publish {
            match self.try_next_publish(WAIT).await {
                Some(p) => p,
                None => panic!(
                    "no PUBLISH within {WAIT:?}; other events: {}",
                    self.events.stashed()
                ),
            }
        }

        /// Assert no PUBLISH arrives within QUIET.
        pub async fn expect_no_publish(&mut self) {
            if let Some(p) = self.try_next_publish(QUIET).await {
                panic!("expected no PUBLISH, got {p:?}");
            }
        }

        /// Wait until the connection ends; returns the error that ended it.
        pub async fn closed(&mut self) -> ConnectionError {
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Closed(e) => Ok(e),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("the connection closes within the wait")
        }

        /// Send DISCONNECT and wait for the broker to close the connection.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("request queued");
            self.closed().await;
        }
    }

    /// Payload as text.
    pub fn text(p: &Publish) -> String {
        String::from_utf8_lossy(&p.payload).into_owned()
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

    /// Set the Session Expiry Interval in CONNECT (keeps other properties).
    pub fn set_session_expiry(o: &mut MqttOptions, seconds: u32) {
        let mut props = o.connect_properties().unwrap_or_default();
        props.session_expiry_interval = Some(seconds);
        o.set_connect_properties(props);
    }

    /// A connected 5.0 client.
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
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Packet(Packet::SubAck(a)) => Ok(a.return_codes),
                    Ev::Closed(e) => panic!("connection closed while subscribing: {e:?}"),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("SUBACK within the wait")
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

        /// Publish without waiting.
        pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .expect("request queued");
        }

        /// Wait for the next PUBACK from the broker.
        pub async fn puback(&mut self) {
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Packet(Packet::PubAck(_)) => Ok(()),
                    Ev::Closed(e) => panic!("connection closed while publishing: {e:?}"),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("PUBACK within the wait")
        }

        /// Publish at QoS 1 and wait for the PUBACK.
        pub async fn publish_acked(&mut self, topic: &str, retain: bool, payload: &[u8]) {
            self.publish(topic, QoS::AtLeastOnce, retain, payload).await;
            self.puback().await;
        }

        /// Next PUBLISH within `wait`, if any (panics if the connection ends).
        pub async fn try_next_publish(&mut self, wait: Duration) -> Option<Publish> {
            self.events
                .find(wait, |ev| match *ev {
                    Ev::Packet(Packet::Publish(p)) => Ok(p),
                    Ev::Closed(e) => panic!("connection closed while waiting for PUBLISH: {e:?}"),
                    other => Err(Box::new(other)),
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
            self.events
                .find(WAIT, |ev| match *ev {
                    Ev::Closed(e) => Ok(e),
                    other => Err(Box::new(other)),
                })
                .await
                .expect("the connection closes within the wait")
        }

        /// Send DISCONNECT (normal) and wait for the broker to close.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("request queued");
            self.closed().await;
        }
    }

    /// Payload as text.
    pub fn text(p: &Publish) -> String {
        String::from_utf8_lossy(&p.payload).into_owned()
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
