//! The `Admin` service: channels, subscriptions and their figures.

use ferry_core::broker::RedriveSelection;
use ferry_core::{Broker, ChannelInfo};
use ferry_proto::pb::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, Gate, Resource, Right};
use crate::convert;
use crate::status::to_status;

/// Serves `ferry.v1.Admin`.
pub struct AdminService {
    broker: Broker,
    /// The principals in force.
    gate: Gate,
    /// When the broker started, for its uptime.
    started: std::time::Instant,
}

impl AdminService {
    /// A service over `broker`, its callers judged by the principals `gate` holds.
    pub fn new(broker: Broker, gate: Gate) -> Self {
        Self {
            broker,
            gate,
            started: std::time::Instant::now(),
        }
    }
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Admin for AdminService {
    /// Broker-wide figures name no channel: every authenticated caller may read them.
    async fn get_broker(&self, _: Request<pb::GetBrokerRequest>) -> Answer<pb::BrokerInfo> {
        let counters = self.broker.store_counters();
        let space = self.broker.space();
        Ok(Response::new(pb::BrokerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime: Some(convert::duration(self.started.elapsed())),
            commits: counters.commits,
            device_syncs: counters.device_syncs,
            messages_written: counters.messages,
            ack_states_written: counters.ack_states,
            message_cache_bytes: self.broker.cached_bytes() as u64,
            disk_free_bytes: space.free,
            disk_free_needed_bytes: space.watermark,
            publishing_refused: space.low,
            channels: self.broker.channel_count() as u32,
            checkpoints: counters.checkpoints,
        }))
    }

    async fn create_channel(
        &self,
        request: Request<pb::CreateChannelRequest>,
    ) -> Answer<pb::ChannelInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, Resource::Channel(&request.name))?;
        let settings = convert::channel_settings(&request)?;
        let info = self
            .broker
            .create_channel(&request.name, settings)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::channel_info(info)))
    }

    async fn update_channel(
        &self,
        request: Request<pb::CreateChannelRequest>,
    ) -> Answer<pb::ChannelInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, Resource::Channel(&request.name))?;
        let settings = convert::channel_settings(&request)?;
        let info = self
            .broker
            .update_channel(&request.name, settings)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::channel_info(info)))
    }

    async fn get_channel(
        &self,
        request: Request<pb::GetChannelRequest>,
    ) -> Answer<pb::ChannelInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let name = request.into_inner().name;
        caller.require_visible(&name)?;
        let info = self.broker.channel_info(&name).await.map_err(to_status)?;
        Ok(Response::new(convert::channel_info(visible(&caller, info))))
    }

    async fn list_channels(
        &self,
        request: Request<pb::ListChannelsRequest>,
    ) -> Answer<pb::ListChannelsResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let channels = self
            .broker
            .list_channels()
            .await
            .into_iter()
            .filter(|channel| caller.may_see_channel(&channel.name))
            .map(|channel| convert::channel_info(visible(&caller, channel)))
            .collect();
        Ok(Response::new(pb::ListChannelsResponse { channels }))
    }

    async fn delete_channel(
        &self,
        request: Request<pb::DeleteChannelRequest>,
    ) -> Answer<pb::DeleteChannelResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let name = request.into_inner().name;
        caller.require(Right::Admin, Resource::Channel(&name))?;
        self.broker.delete_channel(&name).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteChannelResponse {}))
    }

    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Answer<pb::SubscriptionInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, subscription(&request.channel, &request.name))?;
        may_dead_letter_into(&caller, &request.dead_letter_channel)?;
        may_fork(&caller, &request.channel, request.start.as_ref())?;
        let settings = convert::subscription_settings(&request)?;
        let start = convert::position(request.start)?;
        let stats = self
            .broker
            .create_subscription(&request.channel, &request.name, settings, start)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription_info(
            &request.channel,
            stats,
        )))
    }

    async fn update_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Answer<pb::SubscriptionInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, subscription(&request.channel, &request.name))?;
        if let Err(refused) = may_dead_letter_into(&caller, &request.dead_letter_channel) {
            // Keeping the dead-letter channel an operator set needs no right on it: looked up
            // only for a caller who lacks one.
            let current = (self.broker)
                .subscription_info(&request.channel, &request.name)
                .await
                .ok()
                .and_then(|s| s.dead_letter_channel);
            if current.as_deref() != Some(request.dead_letter_channel.as_str()) {
                return Err(refused);
            }
        }
        let settings = convert::subscription_settings(&request)?;
        self.broker
            .update_subscription(&request.channel, &request.name, settings)
            .await
            .map_err(to_status)?;
        let stats = self
            .broker
            .subscription_info(&request.channel, &request.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription_info(
            &request.channel,
            stats,
        )))
    }

    async fn redrive(&self, request: Request<pb::RedriveRequest>) -> Answer<pb::RedriveResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, Resource::Channel(&request.channel))?;
        let selection = RedriveSelection {
            first_sequence: request.first_sequence,
            last_sequence: request.last_sequence,
            attributes: request.attributes.into_iter().collect(),
            limit: request.limit,
        };
        // Each letter goes back to its origin subscription: that takes admin there too.
        let may_redrive_to = |channel: &str, name: &str| {
            caller.may(Right::Admin, Resource::Subscription { channel, name })
        };
        let outcome = self
            .broker
            .redrive(&request.channel, &selection, &may_redrive_to)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RedriveResponse {
            redriven: outcome.redriven,
            skipped: outcome.skipped,
            first_skip_reason: outcome.first_skip_reason.unwrap_or_default(),
        }))
    }

    async fn create_derived(
        &self,
        request: Request<pb::DerivedChannel>,
    ) -> Answer<pb::DerivedInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let spec = convert::derived_spec(request.into_inner());
        caller.require(Right::Admin, Resource::Channel(&spec.source))?;
        caller.require(Right::Admin, Resource::Channel(&spec.target))?;
        let info = self.broker.create_derived(spec).await.map_err(to_status)?;
        Ok(Response::new(convert::derived_info(info)))
    }

    async fn delete_derived(
        &self,
        request: Request<pb::DeleteDerivedRequest>,
    ) -> Answer<pb::DeleteDerivedResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, Resource::Channel(&request.source))?;
        caller.require(Right::Admin, Resource::Channel(&request.target))?;
        self.broker
            .delete_derived(&request.source, &request.target)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteDerivedResponse {}))
    }

    async fn list_derived(
        &self,
        request: Request<pb::ListDerivedRequest>,
    ) -> Answer<pb::ListDerivedResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let derived = self
            .broker
            .list_derived()
            .into_iter()
            // Both sides: each names the other, and shows its filter and reshaping.
            .filter(|d| {
                caller.may_see_channel(&d.spec.source) && caller.may_see_channel(&d.spec.target)
            })
            .map(convert::derived_info)
            .collect();
        Ok(Response::new(pb::ListDerivedResponse { derived }))
    }

    async fn seek(&self, request: Request<pb::SeekRequest>) -> Answer<pb::SubscriptionInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(
            Right::Admin,
            subscription(&request.channel, &request.subscription),
        )?;
        may_fork(&caller, &request.channel, request.to.as_ref())?;
        let to = convert::position(request.to)?;
        let stats = self
            .broker
            .seek(&request.channel, &request.subscription, to)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription_info(
            &request.channel,
            stats,
        )))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Answer<pb::SubscriptionInfo> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require_any(
            &[Right::Subscribe, Right::Admin],
            subscription(&request.channel, &request.name),
        )?;
        let stats = self
            .broker
            .subscription_info(&request.channel, &request.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription_info(
            &request.channel,
            stats,
        )))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Answer<pb::ListSubscriptionsResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let channel = request.into_inner().channel;
        caller.require_visible(&channel)?;
        let subscriptions = self
            .broker
            .list_subscriptions(&channel)
            .await
            .map_err(to_status)?;
        let subscriptions = subscriptions
            .into_iter()
            .filter(|s| caller.may_read_subscription(&channel, &s.name))
            .map(|s| convert::subscription_info(&channel, s))
            .collect();
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions,
        }))
    }

    async fn diff_config(
        &self,
        request: Request<pb::DiffConfigRequest>,
    ) -> Answer<pb::DiffConfigResponse> {
        // A plan reads the state of everything the file could declare.
        Caller::of(&request, &self.gate)?.require(Right::Admin, Resource::Everything)?;
        let request = request.into_inner();
        let source = match request.source_name.as_str() {
            "" => "the configuration",
            name => name,
        };
        let config = crate::Config::parse(&request.toml, source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let steps = self
            .broker
            .plan(&config.declarations(), &config.derived_specs())
            .await;
        Ok(Response::new(pb::DiffConfigResponse {
            steps: steps.into_iter().map(convert::config_step).collect(),
        }))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Answer<pb::DeleteSubscriptionResponse> {
        let caller = Caller::of(&request, &self.gate)?;
        let request = request.into_inner();
        caller.require(Right::Admin, subscription(&request.channel, &request.name))?;
        self.broker
            .delete_subscription(&request.channel, &request.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }
}

fn subscription<'a>(channel: &'a str, name: &'a str) -> Resource<'a> {
    Resource::Subscription { channel, name }
}

/// A channel's figures with only the subscriptions the caller may read.
fn visible(caller: &Caller, mut info: ChannelInfo) -> ChannelInfo {
    let channel = info.name.clone();
    (info.subscriptions).retain(|s| caller.may_read_subscription(&channel, &s.name));
    info
}

/// A subscription's dead letters are written to its dead-letter channel (`dead`, "" for none):
/// naming one takes publish (or admin) on it.
fn may_dead_letter_into(caller: &Caller, dead: &str) -> Result<(), Status> {
    match dead {
        "" => Ok(()),
        dead => caller.require_any(&[Right::Publish, Right::Admin], Resource::Channel(dead)),
    }
}

/// Starting at, or seeking to, where another subscription is copies its progress: that takes
/// the right to read that subscription.
fn may_fork(caller: &Caller, channel: &str, at: Option<&pb::Position>) -> Result<(), Status> {
    match at.and_then(|p| p.at.as_ref()) {
        Some(pb::position::At::Subscription(source)) => caller.require_any(
            &[Right::Subscribe, Right::Admin],
            subscription(channel, source),
        ),
        _ => Ok(()),
    }
}
