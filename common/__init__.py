"""Small pieces both services share: option tables, logging, metrics export."""
