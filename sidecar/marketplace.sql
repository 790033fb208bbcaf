-- The sample marketplace (Core Transaction 1), modelled on a Laravel marketplace.
-- Every column beyond the essentials has a default, so a plain
--   INSERT INTO users (name, email, password) VALUES (...)
-- works.  Idempotent: safe to run on a database that already has it.

CREATE TABLE IF NOT EXISTS users (
    id                bigserial PRIMARY KEY,
    name              text        NOT NULL,
    email             text        NOT NULL UNIQUE,
    password          text        NOT NULL,
    remember_token    text,
    role              text        NOT NULL DEFAULT 'customer' CHECK (role IN ('customer', 'seller', 'admin')),
    phone             text,
    status            text        NOT NULL DEFAULT 'active',
    email_verified_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS addresses (
    id          bigserial PRIMARY KEY,
    user_id     bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type        text        NOT NULL DEFAULT 'shipping',
    line1       text        NOT NULL DEFAULT '',
    line2       text,
    city        text        NOT NULL DEFAULT '',
    state       text,
    postal_code text        NOT NULL DEFAULT '',
    country     text        NOT NULL DEFAULT 'US',
    is_default  boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shops (
    id          bigserial PRIMARY KEY,
    user_id     bigint      NOT NULL REFERENCES users (id),
    name        text        NOT NULL,
    slug        text        NOT NULL UNIQUE,
    description text,
    status      text        NOT NULL DEFAULT 'active',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS categories (
    id         bigserial PRIMARY KEY,
    parent_id  bigint REFERENCES categories (id),
    name       text        NOT NULL,
    slug       text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS products (
    id               bigserial PRIMARY KEY,
    shop_id          bigint        NOT NULL REFERENCES shops (id),
    category_id      bigint        REFERENCES categories (id),
    name             text          NOT NULL,
    slug             text          NOT NULL,
    sku              text,
    description      text,
    price            numeric(12,2) NOT NULL DEFAULT 0,
    compare_at_price numeric(12,2),
    stock            integer       NOT NULL DEFAULT 0,
    status           text          NOT NULL DEFAULT 'active' CHECK (status IN ('draft', 'active', 'inactive', 'archived')),
    meta_title       text,
    meta_description text,
    meta_keywords    text,
    created_at       timestamptz   NOT NULL DEFAULT now(),
    updated_at       timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders (
    id               bigserial PRIMARY KEY,
    order_number     text          NOT NULL DEFAULT ('ORD-' || upper(substr(md5(random()::text), 1, 10))),
    user_id          bigint        NOT NULL REFERENCES users (id),
    seller_id        bigint        REFERENCES users (id),
    shop_id          bigint        REFERENCES shops (id),
    status           text          NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'shipped', 'delivered', 'cancelled', 'refunded')),
    payment_status   text          NOT NULL DEFAULT 'pending'
                     CHECK (payment_status IN ('pending', 'paid', 'failed', 'refunded')),
    payment_method   text          NOT NULL DEFAULT 'card',
    subtotal         numeric(12,2) NOT NULL DEFAULT 0,
    shipping_total   numeric(12,2) NOT NULL DEFAULT 0,
    tax_total        numeric(12,2) NOT NULL DEFAULT 0,
    discount_total   numeric(12,2) NOT NULL DEFAULT 0,
    total            numeric(12,2) NOT NULL DEFAULT 0,
    currency         text          NOT NULL DEFAULT 'USD',
    tracking_number  text,
    shipping_carrier text,
    shipping_address jsonb,
    notes            text,
    created_at       timestamptz   NOT NULL DEFAULT now(),
    updated_at       timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS order_items (
    id         bigserial PRIMARY KEY,
    order_id   bigint        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id bigint        NOT NULL REFERENCES products (id),
    quantity   integer       NOT NULL DEFAULT 1,
    price      numeric(12,2) NOT NULL DEFAULT 0,
    total      numeric(12,2) NOT NULL DEFAULT 0,
    created_at timestamptz   NOT NULL DEFAULT now(),
    updated_at timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS carts (
    id         bigserial PRIMARY KEY,
    user_id    bigint REFERENCES users (id),
    session_id text,
    status     text        NOT NULL DEFAULT 'active',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS cart_items (
    id         bigserial PRIMARY KEY,
    cart_id    bigint        NOT NULL REFERENCES carts (id) ON DELETE CASCADE,
    product_id bigint        NOT NULL REFERENCES products (id),
    quantity   integer       NOT NULL DEFAULT 1,
    price      numeric(12,2) NOT NULL DEFAULT 0,
    created_at timestamptz   NOT NULL DEFAULT now(),
    updated_at timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS reviews (
    id         bigserial PRIMARY KEY,
    product_id bigint      NOT NULL REFERENCES products (id),
    user_id    bigint      NOT NULL REFERENCES users (id),
    order_id   bigint      REFERENCES orders (id),
    rating     smallint    NOT NULL CHECK (rating BETWEEN 1 AND 5),
    title      text,
    comment    text,
    status     text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS product_views (
    id         bigserial PRIMARY KEY,
    product_id bigint      NOT NULL REFERENCES products (id),
    user_id    bigint      REFERENCES users (id),
    session_id text,
    ip_address text,
    user_agent text,
    viewed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS orders_user_id ON orders (user_id);
CREATE INDEX IF NOT EXISTS orders_seller_id ON orders (seller_id);
CREATE INDEX IF NOT EXISTS orders_created_at ON orders (created_at, id);
CREATE INDEX IF NOT EXISTS order_items_order_id ON order_items (order_id);
CREATE INDEX IF NOT EXISTS products_shop_id ON products (shop_id);
CREATE INDEX IF NOT EXISTS reviews_product_id ON reviews (product_id);
CREATE INDEX IF NOT EXISTS product_views_product_id ON product_views (product_id);
CREATE INDEX IF NOT EXISTS cart_items_cart_id ON cart_items (cart_id);

-- "Was this review helpful?": one vote per customer and review, either way.
CREATE TABLE IF NOT EXISTS review_votes (
    id         bigserial PRIMARY KEY,
    review_id  bigint      NOT NULL REFERENCES reviews (id) ON DELETE CASCADE,
    user_id    bigint      NOT NULL REFERENCES users (id),
    helpful    boolean     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (review_id, user_id)
);
