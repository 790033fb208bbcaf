-- Export queries of the HTTP API, run on the marketplace database in read-only
-- transactions with a statement timeout.  A marketplace with another schema replaces
-- this file (setting api.sql_dir), not the code: keep the block names and parameters.
--
-- Lists page by keyset: every list takes %(after)s (the last id of the previous page)
-- and %(limit)s, and returns rows ordered by id.  A filter left out is NULL.
-- Columns excluded by the mapping (password, remember_token, ...) are stripped from every
-- answer by the API whatever these queries select.

-- name: customers
SELECT u.id, u.name, u.email, u.phone, u.status, u.email_verified_at, u.created_at, u.updated_at,
       (SELECT count(*) FROM orders o WHERE o.user_id = u.id) AS orders_count
FROM users u
WHERE u.role = 'customer'
  AND u.id > %(after)s
  AND (%(date_from)s::timestamptz IS NULL OR u.created_at >= %(date_from)s::timestamptz)
  AND (%(date_to)s::timestamptz IS NULL OR u.created_at < %(date_to)s::timestamptz)
  AND (%(has_orders)s::boolean IS NULL
       OR EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id) = %(has_orders)s::boolean)
ORDER BY u.id
LIMIT %(limit)s

-- name: customer
SELECT id, name, email, phone, status, email_verified_at, created_at, updated_at
FROM users WHERE id = %(id)s AND role = 'customer'

-- name: customer_addresses
SELECT id, type, line1, line2, city, state, postal_code, country, is_default, created_at, updated_at
FROM addresses WHERE user_id = %(id)s ORDER BY id

-- name: customer_statistics
-- The customer's orders created in [date_from, date_to) (NULL: unbounded).  Cancelled and
-- refunded orders count as orders but not as money spent.
SELECT count(*) AS orders_count,
       coalesce(sum(total) FILTER (WHERE status NOT IN ('cancelled', 'refunded')), 0) AS total_spent,
       min(created_at) AS first_order_at,
       max(created_at) AS last_order_at,
       coalesce(round(avg(total) FILTER (WHERE status NOT IN ('cancelled', 'refunded')), 2), 0)
           AS average_order_value
FROM orders
WHERE user_id = %(id)s
  AND (%(date_from)s::timestamptz IS NULL OR created_at >= %(date_from)s::timestamptz)
  AND (%(date_to)s::timestamptz IS NULL OR created_at < %(date_to)s::timestamptz)

-- name: customer_orders
-- The order history: the customer's %(limit)s most recent orders created in
-- [date_from, date_to), newest first.
SELECT id, order_number, status, payment_status, total, currency, created_at
FROM orders
WHERE user_id = %(id)s
  AND (%(date_from)s::timestamptz IS NULL OR created_at >= %(date_from)s::timestamptz)
  AND (%(date_to)s::timestamptz IS NULL OR created_at < %(date_to)s::timestamptz)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- name: orders
SELECT o.id, o.order_number, o.user_id, o.seller_id, o.shop_id, o.status, o.payment_status,
       o.payment_method, o.subtotal, o.shipping_total, o.tax_total, o.discount_total, o.total,
       o.currency, o.tracking_number, o.shipping_carrier, o.shipping_address, o.created_at,
       o.updated_at,
       (SELECT count(*) FROM order_items i WHERE i.order_id = o.id) AS items_count
FROM orders o
WHERE o.id > %(after)s
  AND (%(customer_id)s::bigint IS NULL OR o.user_id = %(customer_id)s::bigint)
  AND (%(seller_id)s::bigint IS NULL OR o.seller_id = %(seller_id)s::bigint)
  AND (%(status)s::text IS NULL OR o.status = %(status)s::text)
  AND (%(payment_status)s::text IS NULL OR o.payment_status = %(payment_status)s::text)
  AND (%(date_from)s::timestamptz IS NULL OR o.created_at >= %(date_from)s::timestamptz)
  AND (%(date_to)s::timestamptz IS NULL OR o.created_at < %(date_to)s::timestamptz)
ORDER BY o.id
LIMIT %(limit)s

-- name: order
SELECT id, order_number, user_id, seller_id, shop_id, status, payment_status, payment_method,
       subtotal, shipping_total, tax_total, discount_total, total, currency, tracking_number,
       shipping_carrier, shipping_address, notes, created_at, updated_at
FROM orders WHERE id = %(id)s

-- name: order_items
SELECT i.id, i.product_id, p.name AS product_name, p.sku, i.quantity, i.price, i.total
FROM order_items i LEFT JOIN products p ON p.id = i.product_id
WHERE i.order_id = %(id)s ORDER BY i.id

-- name: order_parties
-- The customer, the seller and the shop of one order.
SELECT c.id AS customer_id, c.name AS customer_name, c.email AS customer_email,
       c.phone AS customer_phone,
       s.id AS seller_id, s.name AS seller_name, s.email AS seller_email,
       sh.id AS shop_id, sh.name AS shop_name, sh.slug AS shop_slug
FROM orders o
JOIN users c ON c.id = o.user_id
LEFT JOIN users s ON s.id = o.seller_id
LEFT JOIN shops sh ON sh.id = o.shop_id
WHERE o.id = %(id)s

-- name: products
SELECT p.id, p.shop_id, s.user_id AS seller_id, p.category_id, c.slug AS category, p.name,
       p.slug, p.sku, p.description, p.price, p.compare_at_price, p.stock, p.status,
       p.meta_title, p.meta_description, p.meta_keywords, p.created_at, p.updated_at
FROM products p
JOIN shops s ON s.id = p.shop_id
LEFT JOIN categories c ON c.id = p.category_id
WHERE p.id > %(after)s
  AND (%(seller_id)s::bigint IS NULL OR s.user_id = %(seller_id)s::bigint)
  AND (%(category)s::text IS NULL OR c.slug = %(category)s::text OR c.id::text = %(category)s::text)
  AND (%(status)s::text IS NULL OR p.status = %(status)s::text)
  AND (%(in_stock)s::boolean IS NULL OR (p.stock > 0) = %(in_stock)s::boolean)
  AND (%(search)s::text IS NULL OR p.name ILIKE %(search)s::text OR p.sku ILIKE %(search)s::text
       OR p.description ILIKE %(search)s::text)
ORDER BY p.id
LIMIT %(limit)s

-- name: product
SELECT p.id, p.shop_id, p.category_id, p.name, p.slug, p.sku, p.description, p.price,
       p.compare_at_price, p.stock, p.status, p.meta_title, p.meta_description, p.meta_keywords,
       p.created_at, p.updated_at,
       s.name AS shop_name, s.slug AS shop_slug, s.user_id AS seller_id, u.name AS seller_name,
       c.name AS category_name, c.slug AS category_slug
FROM products p
JOIN shops s ON s.id = p.shop_id
JOIN users u ON u.id = s.user_id
LEFT JOIN categories c ON c.id = p.category_id
WHERE p.id = %(id)s

-- name: product_ratings
-- Approved reviews only: the rating a shopper sees.
SELECT rating, count(*) AS reviews
FROM reviews WHERE product_id = %(id)s AND status = 'approved'
GROUP BY rating

-- name: product_performance
-- One product over [start, end): its views, and the orders (not cancelled or refunded)
-- created in the period that hold it, with the units and revenue of its lines in them.
SELECT
    (SELECT count(*) FROM product_views
      WHERE product_id = %(id)s AND viewed_at >= %(start)s AND viewed_at < %(end)s) AS views,
    count(DISTINCT o.id) AS orders,
    coalesce(sum(i.quantity), 0) AS units_sold,
    coalesce(sum(i.total), 0) AS revenue
FROM order_items i
JOIN orders o ON o.id = i.order_id
WHERE i.product_id = %(id)s
  AND o.created_at >= %(start)s AND o.created_at < %(end)s
  AND o.status NOT IN ('cancelled', 'refunded')

-- name: reviews
-- With the product and its shop, and the "was this helpful?" votes (new columns last, so
-- a CSV read by position keeps its columns).
SELECT r.id, r.product_id, r.user_id, r.order_id, r.rating, r.title, r.comment, r.status,
       r.created_at, r.updated_at,
       p.name AS product_name, p.slug AS product_slug,
       p.shop_id, s.name AS shop_name, s.slug AS shop_slug,
       v.helpful_votes, v.not_helpful_votes
FROM reviews r
LEFT JOIN products p ON p.id = r.product_id
LEFT JOIN shops s ON s.id = p.shop_id
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE rv.helpful) AS helpful_votes,
           count(*) FILTER (WHERE NOT rv.helpful) AS not_helpful_votes
    FROM review_votes rv WHERE rv.review_id = r.id
) v
WHERE r.id > %(after)s
  AND (%(product_id)s::bigint IS NULL OR r.product_id = %(product_id)s::bigint)
  AND (%(user_id)s::bigint IS NULL OR r.user_id = %(user_id)s::bigint)
  AND (%(rating)s::int IS NULL OR r.rating = %(rating)s::int)
  AND (%(status)s::text IS NULL OR r.status = %(status)s::text)
  AND (%(date_from)s::timestamptz IS NULL OR r.created_at >= %(date_from)s::timestamptz)
  AND (%(date_to)s::timestamptz IS NULL OR r.created_at < %(date_to)s::timestamptz)
ORDER BY r.id
LIMIT %(limit)s

-- name: analytics_period
-- Figures of one period [start, end).  GMV leaves out cancelled and refunded orders; a
-- returning customer ordered in the period and also before it.
SELECT
    (SELECT coalesce(sum(total), 0) FROM orders
      WHERE created_at >= %(start)s AND created_at < %(end)s
        AND status NOT IN ('cancelled', 'refunded')) AS gmv,
    (SELECT count(*) FROM orders
      WHERE created_at >= %(start)s AND created_at < %(end)s) AS orders,
    (SELECT count(*) FROM users
      WHERE role = 'customer' AND created_at >= %(start)s AND created_at < %(end)s) AS new_customers,
    (SELECT count(DISTINCT o.user_id) FROM orders o
      WHERE o.created_at >= %(start)s AND o.created_at < %(end)s
        AND EXISTS (SELECT 1 FROM orders b WHERE b.user_id = o.user_id AND b.created_at < %(start)s))
        AS returning_customers,
    (SELECT count(*) FROM product_views
      WHERE viewed_at >= %(start)s AND viewed_at < %(end)s) AS product_views

-- name: analytics_top_products
SELECT i.product_id, p.name, sum(i.quantity) AS quantity, sum(i.total) AS revenue
FROM order_items i
JOIN orders o ON o.id = i.order_id
LEFT JOIN products p ON p.id = i.product_id
WHERE o.created_at >= %(start)s AND o.created_at < %(end)s
  AND o.status NOT IN ('cancelled', 'refunded')
GROUP BY i.product_id, p.name
ORDER BY revenue DESC, i.product_id
LIMIT 10

-- name: analytics_ratings
SELECT rating, count(*) AS reviews
FROM reviews WHERE created_at >= %(start)s AND created_at < %(end)s
GROUP BY rating
