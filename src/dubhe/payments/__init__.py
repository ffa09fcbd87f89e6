"""Card payments: Stripe Checkout sessions out, Stripe's signed webhook in, applied once."""
