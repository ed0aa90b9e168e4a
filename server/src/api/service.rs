//! `orderflow.v1.OrderService`: the gRPC methods, each a thin layer of parse → store → respond.
//! Each runs inside the request's SERVER span (see `api::request_span`), which [`finish`] marks
//! with the gRPC status code.

use orderflow_proto::orderflow::v1::{self as pb, order_service_server::OrderService};
use tonic::{Request, Response, Status};
use tracing::{Span, info};

use super::{
    OrderApi,
    error::{Error, finish},
    request::{self, ListQuery},
    status_stream::{self, UpdateStream},
};
use crate::order::{
    NewOrder,
    store::{self, PlaceError, Placed},
};

impl OrderApi {
    async fn place(&self, request: pb::PlaceOrderRequest) -> Result<pb::Order, Error> {
        Span::current().record("customer.id", request.customer_id.as_str());
        let order = NewOrder::try_from(request)?;
        let placed = self.placements.place(order).await.map_err(|e| match e {
            PlaceError::KeyReused { existing } => Error::KeyReused { existing },
            PlaceError::Database(e) => Error::from(e),
            PlaceError::ShuttingDown => {
                Error::Unavailable("the server is shutting down; retry elsewhere".into())
            }
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

    async fn get(&self, request: pb::GetOrderRequest) -> Result<pb::Order, Error> {
        let order_id = request::order_id("order_id", &request.order_id)?;
        Span::current().record("order.id", order_id.as_str());
        let order = store::get(&self.pool, &order_id)
            .await?
            .ok_or(Error::NotFound(order_id))?;
        Ok(order.into())
    }

    async fn list(&self, request: pb::ListOrdersRequest) -> Result<pb::ListOrdersResponse, Error> {
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

    async fn watch(&self, request: pb::WatchOrderRequest) -> Result<UpdateStream, Error> {
        let order_id = request::order_id("order_id", &request.order_id)?;
        Span::current().record("order.id", order_id.as_str());
        status_stream::start(self, order_id, request.resume_after_version).await
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn place_order(
        &self,
        req: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        finish(self.place(req.into_inner()).await)
    }

    async fn get_order(
        &self,
        req: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        finish(self.get(req.into_inner()).await)
    }

    async fn list_orders(
        &self,
        req: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        finish(self.list(req.into_inner()).await)
    }

    type WatchOrderStream = UpdateStream;

    async fn watch_order(
        &self,
        req: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        finish(self.watch(req.into_inner()).await)
    }
}
