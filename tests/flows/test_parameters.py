"""The flows' parameters as the Prefect UI and server see them: every one described, and a
malformed step selection refused when a deployment run is created, before any worker picks it up."""

from __future__ import annotations

import asyncio
import re

import pytest
from prefect.client.orchestration import get_client

from floorplan_ft.steps import STEPS_PATTERN, parse_steps
from flows.cv_batch import cv_batch
from flows.ft_pipeline import ft_pipeline


@pytest.mark.parametrize("flow", [ft_pipeline, cv_batch], ids=["ft-pipeline", "cv-batch"])
def test_every_parameter_has_a_description(flow):
    properties = flow.parameters.model_dump()["properties"]
    assert properties and all(p.get("description") for p in properties.values()), properties


@pytest.mark.parametrize("spec", ["all", "0,1,2,3a,3b,4,5,6", "2-6", "3", "0, 3B", "ALL", "1 - 5"])
def test_the_pattern_accepts_what_parse_steps_accepts(spec):
    assert re.match(STEPS_PATTERN, spec) and parse_steps(spec)


@pytest.mark.parametrize("spec", ["0,9", "7", "3c", "1-", "", "steps"])
def test_the_pattern_refuses_malformed_selections(spec):
    assert not re.match(STEPS_PATTERN, spec)
    with pytest.raises(ValueError, match="step"):
        parse_steps(spec)


@pytest.mark.prefect
def test_the_server_refuses_a_bad_steps_parameter_when_the_run_is_created(prefect_api):
    from prefect.exceptions import PrefectHTTPStatusError

    async def scenario():
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("ft-pipeline")
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name="parameter-check",
                parameter_openapi_schema=ft_pipeline.parameters.model_dump(),
                enforce_parameter_schema=True,
            )
            good = await client.create_flow_run_from_deployment(deployment_id, parameters={"steps": "2-6"})
            assert good.parameters["steps"] == "2-6"
            with pytest.raises(PrefectHTTPStatusError) as refused:
                await client.create_flow_run_from_deployment(deployment_id, parameters={"steps": "0,9"})
            return refused.value.response

    response = asyncio.run(scenario())
    assert response.status_code in (409, 422) and "steps" in response.text
