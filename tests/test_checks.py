"""Every input error is caught while tracing and names the argument, expected and actual value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def _setup(c=3):
  params, state = bnjax.init(c)
  return params, state, jnp.ones((4, c))


def test_traced_train_flag_is_a_type_error_that_says_mark_it_static():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`train` must be a static Python bool.*static_argnames"):
    jax.jit(lambda t: bnjax.batch_norm(params, state, x, t))(True)


def test_non_bool_train_flag_is_a_type_error():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`train` must be a Python bool; got 1"):
    bnjax.batch_norm(params, state, x, 1)


@pytest.mark.parametrize("field", ["scale", "bias"])
def test_param_feature_size_mismatch_names_the_field(field):
  params, state, x = _setup()
  params = params._replace(**{field: jnp.ones(4)})
  with pytest.raises(ValueError, match=rf"`params.{field}` has shape \(4,\) but `x` of shape "
                     r"\(4, 3\) has feature shape \(3,\)"):
    bnjax.batch_norm(params, state, x, True)


@pytest.mark.parametrize("field", ["mean", "var"])
def test_state_feature_size_mismatch_names_the_field(field):
  params, state, x = _setup()
  state = state._replace(**{field: jnp.ones(2)})
  with pytest.raises(ValueError, match=rf"`state.{field}` has shape \(2,\).*bnjax.init\(3\)"):
    bnjax.batch_norm(params, state, x, False)


def test_mismatch_is_caught_under_jit_at_trace_time():
  params, state, _ = _setup()
  with pytest.raises(ValueError, match=r"feature shape \(5,\)"):
    jax.jit(bnjax.batch_norm, static_argnames="train")(params, state, jnp.ones((2, 5)), train=True)


@pytest.mark.parametrize("axis, message", [
    (2, r"`axis` 2 is out of range for `x` of rank 2; expected a value in \[-2, 1\]"),
    ((1, -1), r"`axis` \(1, -1\) names the same axis twice"),
    ((), r"`axis` must name at least one feature axis"),
])
def test_bad_axis_is_a_value_error(axis, message):
  params, state, x = _setup()
  with pytest.raises(ValueError, match=message):
    bnjax.batch_norm(params, state, x, True, axis=axis)


def test_float_axis_is_a_type_error():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`axis` must be an int or a tuple of ints; got 1.0"):
    bnjax.batch_norm(params, state, x, True, axis=1.0)


def test_integer_input_is_a_type_error_naming_x():
  params, state, _ = _setup()
  with pytest.raises(TypeError, match=r"`x` must have a floating dtype; got int32"):
    bnjax.batch_norm(params, state, jnp.ones((4, 3), jnp.int32), True)


@pytest.mark.parametrize("shape", [(4, 2), (2, 4, 3), (5, 1)])
def test_mask_that_does_not_broadcast_is_a_value_error(shape):
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"`mask` of shape .* (does not broadcast|has more dimensions)"):
    bnjax.batch_norm(params, state, x, True, mask=jnp.ones(shape, bool))


def test_float_mask_is_a_type_error():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`mask` must be boolean.*got dtype float32"):
    bnjax.batch_norm(params, state, x, True, mask=jnp.ones((4, 1)))


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_out_of_range_suggests_the_torch_conversion(momentum):
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"`momentum` must be a number in \[0, 1\].*"
                     rf"from_torch_momentum.*got {momentum}"):
    bnjax.batch_norm(params, state, x, True, momentum=momentum)


@pytest.mark.parametrize("epsilon", [0.0, -1e-5])
def test_non_positive_epsilon_is_a_value_error(epsilon):
  params, state, x = _setup()
  with pytest.raises(ValueError, match=rf"`epsilon` must be a number > 0.*got {epsilon}"):
    bnjax.batch_norm(params, state, x, True, epsilon=epsilon)


@pytest.mark.parametrize("shape, axis", [((1, 3), -1), ((1, 1, 1, 3), -1), ((4, 3), (0, 1))])
def test_one_value_per_channel_in_training_raises_like_pytorch(shape, axis):
  x = jnp.ones(shape)
  feat = x.shape[-1:] if axis == -1 else x.shape
  params, state = bnjax.init(feat)
  with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
    bnjax.batch_norm(params, state, x, True, axis=axis)


def test_one_value_per_channel_is_fine_in_eval():
  params, state = bnjax.init(3)
  y, _ = bnjax.batch_norm(params, state, jnp.ones((1, 3)), False)
  np.testing.assert_allclose(y, np.full((1, 3), 1 / np.sqrt(1 + 1e-5)), rtol=1e-6)


def test_return_stats_in_eval_is_a_value_error():
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"`return_stats=True` needs `train=True`"):
    bnjax.batch_norm(params, state, x, False, return_stats=True)


@pytest.mark.parametrize("num_features", [0, -2, (3, 0), (), 2.5, True])
def test_init_rejects_bad_feature_sizes(num_features):
  with pytest.raises(ValueError, match=r"bnjax.init: `num_features` must be a positive int"):
    bnjax.init(num_features)


def test_from_torch_momentum_rejects_out_of_range():
  with pytest.raises(ValueError, match=r"`torch_momentum` must be in \[0, 1\]; got 1.5"):
    bnjax.from_torch_momentum(1.5)


def test_missing_running_statistics_are_a_value_error():
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"`state.mean` is None"):
    bnjax.batch_norm(params, state._replace(mean=None), x, True)


# ----------------------------------------------------------------------------- None, dicts, arrays


@pytest.mark.parametrize("name", ["momentum", "epsilon"])
def test_none_hyperparameter_is_a_type_error_naming_it(name):
  params, state, x = _setup()
  with pytest.raises(TypeError, match=rf"`{name}` must be a number.*got None"):
    bnjax.batch_norm(params, state, x, True, **{name: None})


def test_string_momentum_is_a_type_error():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`momentum` must be a number in \[0, 1\].*got '0.9'"):
    bnjax.batch_norm(params, state, x, True, momentum="0.9")


@pytest.mark.parametrize("name, values, bad", [
    ("momentum", [0.9, 1.5, 0.99], "1.5"),
    ("epsilon", [1e-5, -1.0, 1e-3], "-1.0"),
])
def test_per_channel_hyperparameter_out_of_range_is_named(name, values, bad):
  params, state, x = _setup()
  with pytest.raises(ValueError, match=rf"`{name}` must be a number.*got \[{bad}\] among its 3"):
    bnjax.batch_norm(params, state, x, True, **{name: np.array(values)})


def test_per_channel_hyperparameter_of_the_wrong_shape_is_named():
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"`momentum` must be a scalar or have the feature shape "
                     r"\(3,\); got shape \(2,\)"):
    bnjax.batch_norm(params, state, x, True, momentum=np.array([0.9, 0.9]))


def test_per_channel_hyperparameters_in_range_are_used_per_channel():
  params, state, x = _setup()
  x = x * jnp.arange(4.0)[:, None]
  momentum = jnp.array([0.0, 0.5, 1.0])
  _, new_state = bnjax.batch_norm(params, state, x, True, momentum=momentum)
  np.testing.assert_allclose(new_state.mean, [1.5, 0.75, 0.0])  # batch mean 1.5


def test_from_torch_momentum_of_none_says_it_has_no_decay_equivalent():
  with pytest.raises(TypeError, match=r"`torch_momentum` must be a number.*got None.*"
                     r"cumulative average"):
    bnjax.from_torch_momentum(None)


@pytest.mark.parametrize("which", ["params", "state"])
def test_none_params_or_state_is_a_type_error_naming_it(which):
  params, state, x = _setup()
  args = {"params": params, "state": state, which: None}
  with pytest.raises(TypeError, match=rf"`{which}` must have the fields .*got None"):
    bnjax.batch_norm(args["params"], args["state"], x, True)


def test_flax_style_dicts_are_a_type_error_that_says_how_to_convert():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`params` must have the fields \('scale', 'bias'\); got a "
                     r"dict with keys \['bias', 'scale'\]; convert it with "
                     r"`bnjax.BatchNormParams\(\*\*d\)`"):
    bnjax.batch_norm({"scale": params.scale, "bias": params.bias}, state, x, True)
  with pytest.raises(TypeError, match=r"`state` must have the fields \('mean', 'var'\); got a "
                     r"dict with keys \['mean', 'var'\]"):
    bnjax.batch_norm(params, {"mean": state.mean, "var": state.var}, x, True)


def test_complex_input_is_refused_with_the_alternative():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"`x` has the complex dtype complex64.*separate channels.*"
                     r"jnp.concatenate\(\[x.real, x.imag\], axis=-1\)"):
    bnjax.batch_norm(params, state, x.astype(jnp.complex64), True)


def test_unknown_stats_route_is_named():
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"`stats_route` must be one of \('auto', 'adaptive', "
                     r"'one_pass'\); got 'fast'"):
    bnjax.batch_norm(params, state, x, True, stats_route="fast")
