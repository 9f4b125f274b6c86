"""Thin NNX modules over ``lcjax.ops``: explicit parameter shapes, logical sharding names only."""
