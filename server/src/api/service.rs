//! `orderflow.v1.OrderService`: the gRPC methods, each a thin layer of parse → store → respond.

use orderflow_proto::orderflow::v1::{self as pb, order_service_server::OrderService};
use tonic::{Request, Response, Status};
use tracing::{Span, info, instrument};

use super::{
    OrderApi,
    error::Error,
    request::{self, ListQuery},
    status_stream::{self, UpdateStream},
};
use crate::order::{
    NewOrder,
    store::{self, PlaceError, Placed},
};

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[instrument(skip_all, fields(customer.id = %req.get_ref().customer_id, order.id = tracing::field::Empty))]
    async fn place_order(
        &self,
        req: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let order = NewOrder::try_from(req.into_inner())?;
        let placed = store::place(&self.pool, &self.outbox, &order)
            .await
            .map_err(|e| match e {
                PlaceError::KeyReused { existing } => Error::KeyReused { existing },
                PlaceError::Database(e) => Error::from(e),
            })?;
        let order = match placed {
            Placed::Created(order) => {
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
        Ok(Response::new(order.into()))
    }

    #[instrument(skip_all, fields(order.id = %req.get_ref().order_id))]
    async fn get_order(
        &self,
        req: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let order_id = request::order_id("order_id", &req.get_ref().order_id)?;
        let order = store::get(&self.pool, &order_id)
            .await
            .map_err(Error::from)?
            .ok_or(Error::NotFound(order_id))?;
        Ok(Response::new(order.into()))
    }

    #[instrument(skip_all)]
    async fn list_orders(
        &self,
        req: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let query = ListQuery::try_from(req.into_inner())?;
        let (orders, more) = store::list(
            &self.pool,
            query.customer_id.as_deref(),
            query.before.as_deref(),
            query.limit,
        )
        .await
        .map_err(Error::from)?;
        let next_page_token = match (more, orders.last()) {
            (true, Some(last)) => last.order_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListOrdersResponse {
            orders: orders.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    type WatchOrderStream = UpdateStream;

    #[instrument(skip_all, fields(order.id = %req.get_ref().order_id))]
    async fn watch_order(
        &self,
        req: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let req = req.into_inner();
        let order_id = request::order_id("order_id", &req.order_id)?;
        let stream = status_stream::start(self, order_id, req.resume_after_version).await?;
        Ok(Response::new(stream))
    }
}
