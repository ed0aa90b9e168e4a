//! `orderflow.v1.OrderService`: the gRPC methods, each a thin layer of parse → store → respond.
//! Each runs inside the request's SERVER span (see `api::request_span`), which [`finish`] marks
//! with the gRPC status code.

use orderflow_proto::orderflow::v1::{self as pb, order_service_server::OrderService};
use tonic::{Request, Response, Status};
use tracing::{Span, info};

use super::{
    OrderApi,
    auth::Caller,
    error::{Error, finish},
    request::{self, ListQuery},
    status_stream::{self, UpdateStream},
};
use crate::order::{
    NewOrder,
    store::{self, PlaceError, Placed},
};

/// The caller the auth interceptor identified ([`Caller::Anyone`] when auth is off).
fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anyone)
}

impl OrderApi {
    async fn place(
        &self,
        request: pb::PlaceOrderRequest,
        caller: &Caller,
    ) -> Result<pb::Order, Error> {
        Span::current().record("customer.id", request.customer_id.as_str());
        if let Some(own) = caller.customer()
            && request.customer_id != own
        {
            return Err(Error::Forbidden(format!(
                "this token may only place orders for customer `{own}`"
            )));
        }
        let order = NewOrder::try_from(request)?;
        let placed = self.placements.place(order).await.map_err(|e| match e {
            PlaceError::KeyReused { existing } => Error::KeyReused { existing },
            PlaceError::Database(e) => Error::from(e),
            PlaceError::ShuttingDown => {
                Error::Unavailable("the server is shutting down; retry elsewhere".into())
            }
            PlaceError::Contended => Error::Unavailable(PlaceError::Contended.to_string()),
        })?;
        let order = match placed {
            Placed::Created(order) => {
                self.metrics.order_placed();
                info!(
                    target: "orderflow::message",
                    service = "order-service",
                    order.id = %order.order_id,
                    customer.id = %order.customer_id,
                    lines = order.items.len(),
                    "Order accepted."
                );
                order
            }
            Placed::Existing(order) => {
                info!(order.id = %order.order_id, "Idempotent retry; returning the existing order.");
                order
            }
        };
        Span::current().record("order.id", order.order_id.as_str());
        Ok(order.into())
    }

    async fn get(&self, request: pb::GetOrderRequest, caller: &Caller) -> Result<pb::Order, Error> {
        let order_id = request::order_id("order_id", &request.order_id)?;
        Span::current().record("order.id", order_id.as_str());
        let order = store::get(&self.pool, &order_id)
            .await?
            .filter(|order| caller.customer().is_none_or(|own| order.customer_id == own))
            // Another customer's order is reported missing, not forbidden: its existence is
            // not this caller's business.
            .ok_or(Error::NotFound(order_id))?;
        Ok(order.into())
    }

    async fn list(
        &self,
        mut request: pb::ListOrdersRequest,
        caller: &Caller,
    ) -> Result<pb::ListOrdersResponse, Error> {
        if let Some(own) = caller.customer() {
            match &request.customer_id {
                Some(asked) if asked != own => {
                    return Err(Error::Forbidden(format!(
                        "this token may only list the orders of customer `{own}`"
                    )));
                }
                _ => request.customer_id = Some(own.to_owned()),
            }
        }
        let query = ListQuery::try_from(request)?;
        let (orders, more) = store::list(
            &self.pool,
            query.customer_id.as_deref(),
            query.before.as_deref(),
            query.limit,
        )
        .await?;
        let next_page_token = match (more, orders.last()) {
            (true, Some(last)) => last.order_id.clone(),
            _ => String::new(),
        };
        Ok(pb::ListOrdersResponse {
            orders: orders.into_iter().map(Into::into).collect(),
            next_page_token,
        })
    }

    async fn watch(
        &self,
        request: pb::WatchOrderRequest,
        caller: &Caller,
    ) -> Result<UpdateStream, Error> {
        let order_id = request::order_id("order_id", &request.order_id)?;
        Span::current().record("order.id", order_id.as_str());
        status_stream::start(
            self,
            order_id,
            request.resume_after_version,
            caller.customer(),
        )
        .await
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn place_order(
        &self,
        req: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let caller = caller(&req);
        finish(self.place(req.into_inner(), &caller).await)
    }

    async fn get_order(
        &self,
        req: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let caller = caller(&req);
        finish(self.get(req.into_inner(), &caller).await)
    }

    async fn list_orders(
        &self,
        req: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let caller = caller(&req);
        finish(self.list(req.into_inner(), &caller).await)
    }

    type WatchOrderStream = UpdateStream;

    async fn watch_order(
        &self,
        req: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let caller = caller(&req);
        finish(self.watch(req.into_inner(), &caller).await)
    }
}
