-- When Inventory confirmed it returned the stock of an order whose payment failed.
ALTER TABLE orders ADD COLUMN stock_released_at INTEGER;
